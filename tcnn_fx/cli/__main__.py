"""``python -m tcnn_fx.cli`` (and ``torchrun ... -m tcnn_fx.cli finetune ...``)."""

from tcnn_fx.cli import main

main()
