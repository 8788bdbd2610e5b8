"""python evaluate.py --model DIR --task tasks/shapes/vqa.yaml [--split val] [--limit N] [--out DIR]

Evaluates a model on one task (a task file, or a task kind with --data in a public layout) and writes the
predictions in the public result formats plus a metrics JSON; `python evaluate.py --help` for every option.
The code lives in unifier/evaluate.py.
"""

import sys

from unifier.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
