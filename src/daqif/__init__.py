"""daqif: the client side of the detector DAQ interface layer.

What a client imports: the generated stubs (`daqif.v1`), typed client wrappers, the Data
Product Specification schema (`daqif.spec`), the frame codec (`daqif.frame`) and errors.
"""

from daqif.errors import DaqException, ErrorCode

__version__ = "0.1.0"

__all__ = ["DaqException", "ErrorCode", "__version__"]
