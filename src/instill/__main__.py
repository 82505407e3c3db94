"""`python -m instill` and `accelerate launch -m instill ...` enter here."""

from instill.cli import main

if __name__ == "__main__":
    main()
