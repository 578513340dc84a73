"""Package layout that ``pyproject.toml`` cannot express: ``conf/`` ships as ``brpg_lightning/conf``.

``conf/`` stays the single top-level source of truth; a wheel or a non-editable install carries a copy as
package data so the app runs from any directory (``brpg_lightning.config.config_dir``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "brpg_lightning.conf"],
    package_dir={"": "src", "brpg_lightning.conf": "conf"},
    package_data={"brpg_lightning.conf": ["*.yaml", "**/*.yaml"]},
)
