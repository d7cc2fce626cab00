"""``python infer.py -i photo.jpg -p "Describe this image"``: the same program as ``jvlm chat``.

Same flags, same output; ``python infer.py --help`` lists them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout without installing

from jvlm.cli import infer_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(infer_main())
