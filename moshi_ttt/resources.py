"""Files shipped inside the installed packages: the project configs (`moshi_ttt/configs/`) and
the browser client (`client/web/`).

They are found through `importlib.resources`, never by walking up from a source file, so that a
wheel install finds them where an editable checkout does. In a checkout, the top-level
`configs` is a symlink to `moshi_ttt/configs`, so the README's `configs/tiny.yaml` paths work
from the repository root; elsewhere (a wheel install) `resolve_config` maps such a path, when no
file of that name exists, to the packaged config of the same name.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePath

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml")


class ResourceError(FileNotFoundError):
    """A file the package should ship is missing (a broken or partial install)."""


def _on_disk(resource: Traversable, what: str) -> Path:
    """The resource as a file-system path (what pip installs; zipped packages are not
    supported: torch and moshi cannot be imported from a zip either)."""
    if not isinstance(resource, Path):
        raise ResourceError(f"{what} ({resource}) is not on the file system: install moshi-ttt "
                            f"as a regular (unzipped) package")
    if not resource.exists():
        raise ResourceError(f"{what} is missing from the installed package ({resource}): "
                            f"reinstall moshi-ttt")
    return resource


def config_dir() -> Path:
    """The packaged project configs (`tiny.yaml`, `moshi-7b.yaml`)."""
    return _on_disk(files("moshi_ttt") / "configs", "the packaged configs directory")


def packaged_configs() -> list[str]:
    """File names of the packaged configs."""
    return sorted(p.name for p in config_dir().iterdir() if p.suffix in CONFIG_SUFFIXES)


def packaged_config(name: str) -> Path:
    """A packaged config by file name, e.g. `tiny.yaml`."""
    path = config_dir() / name
    if not path.is_file():
        raise ResourceError(f"no packaged config {name!r}; the package ships "
                            f"{', '.join(packaged_configs())}")
    return path


def resolve_config(path: Path) -> Path:
    """`path` itself when it exists; otherwise, when it is written `configs/NAME.yaml` (as in
    the README) and NAME.yaml is a packaged config, that packaged file. Anything else is
    returned unchanged, for the caller's own "not found" message."""
    if path.exists():
        return path
    parts = PurePath(path).parts
    if len(parts) == 2 and parts[0] == "configs" and path.suffix in CONFIG_SUFFIXES:
        try:
            found = packaged_config(parts[1])
        except ResourceError:
            return path
        logger.info("%s: no such file here; using the packaged %s", path, found)
        return found
    return path


def web_dir() -> Path:
    """The browser client's directory (index.html, app.js, style.css, ...)."""
    return _on_disk(files("client") / "web", "the browser client")
