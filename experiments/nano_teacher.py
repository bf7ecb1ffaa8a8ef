"""Build a nano Cohere2 teacher for the nano distillation configs (CPU, a couple of minutes).

    python experiments/nano_teacher.py runs/nano-teacher [key=value ...]     # e.g. steps=600

Kept as the command the distillation docs name; the teacher itself lives in ``aetheris.nano_teacher``
(the same one ``make demo`` trains): Tiny Aya's structure scaled down, a BPE trained on the 70-language
corpus, language modelling then tool-calling chat.
"""

import sys

from aetheris.nano_teacher import main

if __name__ == "__main__":
    sys.exit(main())
