"""Which distribution to install for a module a deployed app could not import.

Most distributions are named after their top-level module, and for those the module's name is
what gets installed. This table holds the common ones that are not (``import cv2`` comes from
``opencv-python``), so that a deployed app built without them still starts. It is data only:
what to do with it is :mod:`flashrt_core.autoinstall`'s.

A dotted entry (``google.protobuf``) names a package inside a namespace that many distributions
share; its root alone (``google``) says nothing about what is missing, so it is never installed.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

__all__ = ["DISTRIBUTIONS", "NAMESPACE_ROOTS", "distribution_for", "module_key"]

#: Module name (top-level, or dotted inside a shared namespace) -> the distribution providing it.
DISTRIBUTIONS: Final = MappingProxyType(
    {
        "cv2": "opencv-python",
        "PIL": "pillow",
        "sklearn": "scikit-learn",
        "skimage": "scikit-image",
        "yaml": "pyyaml",
        "bs4": "beautifulsoup4",
        "attr": "attrs",
        "dateutil": "python-dateutil",
        "dotenv": "python-dotenv",
        "multipart": "python-multipart",
        "jwt": "pyjwt",
        "jose": "python-jose",
        "Crypto": "pycryptodome",
        "OpenSSL": "pyopenssl",
        "serial": "pyserial",
        "zmq": "pyzmq",
        "usb": "pyusb",
        "magic": "python-magic",
        "git": "gitpython",
        "fitz": "pymupdf",
        "docx": "python-docx",
        "pptx": "python-pptx",
        "slugify": "python-slugify",
        "websocket": "websocket-client",
        "faiss": "faiss-cpu",
        "llama_cpp": "llama-cpp-python",
        "whisper": "openai-whisper",
        "ffmpeg": "ffmpeg-python",
        "speech_recognition": "SpeechRecognition",
        "mpl_toolkits": "matplotlib",
        "googleapiclient": "google-api-python-client",
        "google.protobuf": "protobuf",
        "google.generativeai": "google-generativeai",
        "google.cloud.storage": "google-cloud-storage",
    }
)

#: Roots of the dotted entries: namespaces no single distribution provides.
NAMESPACE_ROOTS: Final = frozenset(name.split(".")[0] for name in DISTRIBUTIONS if "." in name)


def module_key(name: str) -> str | None:
    """The module to install for when ``import name`` found nothing; ``None`` when unknown.

    That is the top-level name, or the longest dotted entry ``name`` is or lies in; a bare
    namespace root (or a name inside one the table does not know) says too little.
    """
    for key in sorted((k for k in DISTRIBUTIONS if "." in k), key=len, reverse=True):
        if name == key or name.startswith(key + "."):
            return key
    top = name.split(".")[0]
    if not top or top in NAMESPACE_ROOTS:
        return None
    return top


def distribution_for(module: str) -> str:
    """The distribution providing ``module`` (a :func:`module_key`): the table's, or its name."""
    return DISTRIBUTIONS.get(module, module)
