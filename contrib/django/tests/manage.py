#!/usr/bin/env python3
"""The test project's manage.py: a Django + DRF API behind keygate, for tests/django.rs."""
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    # The project, and keygate_django beside it (as a team would install it).
    sys.path[:0] = [str(here), str(here.parent)]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
