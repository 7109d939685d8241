"""Real text that ships with every Python: the docstrings of the standard library, as bytes (a character-level corpus).

The modules are read in sorted order from the interpreter's own library folder, so the corpus is the same on every
machine with the same Python version; it needs no download.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import torch

#: Packages of the standard library whose docstrings make the corpus (English prose about code).
PACKAGES = ("asyncio", "email", "json", "logging", "multiprocessing", "unittest", "urllib", "xml", "concurrent", "http")


def docstrings(package: str) -> list[str]:
    """The docstrings of every module, class and function of a standard-library package, in file order."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    found = []
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) > 40:
                    found.append(text)
    return found


def corpus(packages: tuple[str, ...] = PACKAGES) -> torch.Tensor:
    """The docstrings of ``packages`` joined by blank lines, as a tensor of byte values (a vocabulary of 256)."""
    text = "\n\n".join(doc for package in packages for doc in docstrings(package))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def windows(tokens: torch.Tensor, length: int, validation: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``length`` tokens; the last ``validation`` of the text is held out (no overlap)."""
    cut = int(len(tokens) * (1 - validation))
    train = tokens[: cut - cut % length].reshape(-1, length)
    rest = tokens[cut:]
    held = rest[: len(rest) - len(rest) % length].reshape(-1, length)
    return train, held
