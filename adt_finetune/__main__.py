"""`python -m adt_finetune ...` is `adt-ft ...`; torchrun needs it: `torchrun --nproc-per-node N -m adt_finetune eval ...`."""
from adt_finetune.cli import main

if __name__ == "__main__":
    main()
