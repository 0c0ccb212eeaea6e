"""``python -m tvc_lightning fit|validate|test --config recipes/tiny.yaml``."""

from tvc_lightning.cli import main

if __name__ == "__main__":
    main()
