import argparse
import sys

from .cli import add_serve_arguments, serve_main

parser = argparse.ArgumentParser(prog="python -m jvlm.server", description="OpenAI-compatible server for jina-vlm.")
add_serve_arguments(parser)
sys.exit(serve_main(parser.parse_args()))
