"""`python -m sleeplm ...`: the same as the `sleeplm` console script."""

from sleeplm.cli.main import main

if __name__ == "__main__":
    main()
