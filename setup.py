"""Package layout that ``pyproject.toml`` cannot express: ``conf/`` ships as ``brpg_lightning/conf``.

``conf/`` stays the single top-level source of truth; a wheel or a non-editable install carries a copy as
package data so the app runs from any directory (``brpg_lightning.config.config_dir``).

Every folder of ``conf/`` is declared as a (namespace) package of its own: setuptools treats a data folder
inside a package as an importable package and warns that it "would be ignored" when it is not listed.
"""

from setuptools import find_namespace_packages, find_packages, setup

CONF = "brpg_lightning.conf"
CONF_PACKAGES = [CONF, *(f"{CONF}.{name}" for name in find_namespace_packages("conf"))]

setup(
    packages=[*find_packages("src"), *CONF_PACKAGES],
    package_dir={"": "src", CONF: "conf"},
    package_data={**{name: ["*.yaml"] for name in CONF_PACKAGES},
                  "brpg_lightning": ["assets/*/*.safetensors", "assets/*/*.json"]},
)
