"""`python -m fapecli` runs the fape command line."""

from fapecli.cli import main

if __name__ == "__main__":
    main()
