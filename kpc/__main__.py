"""`python -m kpc` and `torchrun -m kpc` enter the same CLI as the `kpc` script."""

from kpc.cli import main

if __name__ == "__main__":
    main()
