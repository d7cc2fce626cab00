"""``python infer.py -i photo.jpg -p "Describe this image"``: the same program as ``jvlm chat``.

Same flags, same output; ``python infer.py --help`` lists them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout without installing

if __name__ == "__main__":
    from jvlm import hugepages

    hugepages.reexec()  # huge pages for the weights where that pays (src/jvlm/hugepages.py)
    from jvlm.cli import infer_main

    sys.exit(infer_main())
