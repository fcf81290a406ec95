"""Print the image's Python requirements, one per line: pyproject.toml's runtime dependencies, plus what
pip needs to build the project's own wheel. docker/download-wheels.sh downloads this list on the host;
docker/install-deps.sh installs it in the image, from those wheels or from a package index."""
import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join([*project["dependencies"], "setuptools>=69", "wheel"]))
