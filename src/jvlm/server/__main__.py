import argparse
import sys

from .. import hugepages

hugepages.reexec()  # huge pages for the weights where that pays (hugepages.py)

from .cli import add_serve_arguments, serve_main  # noqa: E402

parser = argparse.ArgumentParser(prog="python -m jvlm.server", description="OpenAI-compatible server for jina-vlm.")
add_serve_arguments(parser)
sys.exit(serve_main(parser.parse_args()))
