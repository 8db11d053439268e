"""`python -m cnntrain ...` is the `cnntrain` command; torchrun starts it this way:
`torchrun --nproc_per_node=N -m cnntrain ...`."""

from cnntrain.cli import train_cli

if __name__ == "__main__":
    train_cli()
