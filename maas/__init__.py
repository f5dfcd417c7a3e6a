"""maas: a self-hostable Model-as-a-Service platform.

Nothing heavy runs at import; the CLI (`maas.cli`) and the server (`maas.api.app.build_app`)
import what they need when they start.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
