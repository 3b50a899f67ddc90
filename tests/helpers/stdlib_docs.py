"""Standard-library modules whose docstrings make a small real text corpus for mining tests (the
same list everywhere, so the embedding cache a test module fills is reused)."""

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "inspect",
    "ipaddress", "json", "logging", "mimetypes", "numbers", "operator", "optparse", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "socket", "sqlite3",
    "statistics", "string", "struct", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "typing", "uuid", "warnings", "weakref", "zipfile",
]  # fmt: skip
