"""TFLite interpreters on pyopen-wakeword's bundled C library, one thread and XNNPACK each.

pyopen-wakeword creates its interpreters with no options, so TFLite starts its
default thread pool, which spins between the 80 ms chunks of a live stream and
costs several times the inference itself. Its classes take no options, so
speakerd creates the interpreters here, from the same library and model files.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import os
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pyopen_wakeword

PACKAGE_DIR = Path(pyopen_wakeword.__file__).resolve().parent
MODELS_DIR = PACKAGE_DIR / "models"

_p = C.c_void_p
_i32 = C.c_int32
_size = C.c_size_t


class ModelError(Exception):
    """A .tflite file that TFLite cannot load or that has no float input/output."""


@cache
def library() -> C.CDLL:
    """The bundled libtensorflowlite_c, with the signatures speakerd calls."""
    path = next(iter((PACKAGE_DIR / "lib").glob("*tensorflowlite_c.*")), None)
    if path is None:
        raise ModelError(f"no libtensorflowlite_c in {PACKAGE_DIR / 'lib'}")
    lib = C.CDLL(str(path), mode=os.RTLD_GLOBAL)
    sigs: dict[str, tuple[list[object], object]] = {
        "TfLiteModelCreateFromFile": ([C.c_char_p], _p),
        "TfLiteModelDelete": ([_p], None),
        "TfLiteInterpreterOptionsCreate": ([], _p),
        "TfLiteInterpreterOptionsSetNumThreads": ([_p, _i32], None),
        "TfLiteInterpreterOptionsAddDelegate": ([_p, _p], None),
        "TfLiteInterpreterOptionsDelete": ([_p], None),
        "TfLiteXNNPackDelegateCreate": ([_p], _p),
        "TfLiteXNNPackDelegateDelete": ([_p], None),
        "TfLiteInterpreterCreate": ([_p, _p], _p),
        "TfLiteInterpreterDelete": ([_p], None),
        "TfLiteInterpreterResizeInputTensor": ([_p, _i32, C.POINTER(_i32), _i32], C.c_int),
        "TfLiteInterpreterAllocateTensors": ([_p], C.c_int),
        "TfLiteInterpreterInvoke": ([_p], C.c_int),
        "TfLiteInterpreterGetInputTensor": ([_p, _i32], _p),
        "TfLiteInterpreterGetOutputTensor": ([_p, _i32], _p),
        "TfLiteTensorNumDims": ([_p], _i32),
        "TfLiteTensorDim": ([_p, _i32], _i32),
        "TfLiteTensorByteSize": ([_p], _size),
        "TfLiteTensorCopyFromBuffer": ([_p, _p, _size], C.c_int),
        "TfLiteTensorCopyToBuffer": ([_p, _p, _size], C.c_int),
    }
    for name, (args, result) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = result
    return lib


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hide what TFLite's C code prints on fd 2 ("INFO: Created TensorFlow Lite XNNPACK
    delegate", its own copy of a load error): speakerd reports errors itself, in one
    line. Only used while interpreters are built, at start-up, before other threads run.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Interpreter:
    """One model, one interpreter: `run(x)` copies x in, invokes, returns the output.

    Not thread-safe: use each instance from one thread (the capture thread).
    """

    def __init__(self, path: str | os.PathLike[str], *, input_shape: tuple[int, ...] | None
                 = None, threads: int = 1, xnnpack: bool = True) -> None:
        self.path = Path(path)
        with _quiet_stderr():
            self._build(input_shape, threads, xnnpack)

    def _build(self, input_shape: tuple[int, ...] | None, threads: int, xnnpack: bool
               ) -> None:
        self._lib = lib = library()
        self._model = lib.TfLiteModelCreateFromFile(str(self.path).encode())
        if not self._model:
            raise ModelError(f"{self.path} is not a TFLite model")
        self._options = lib.TfLiteInterpreterOptionsCreate()
        lib.TfLiteInterpreterOptionsSetNumThreads(self._options, threads)
        self._delegate = lib.TfLiteXNNPackDelegateCreate(None) if xnnpack else None
        if self._delegate:
            lib.TfLiteInterpreterOptionsAddDelegate(self._options, self._delegate)
        self._interpreter = lib.TfLiteInterpreterCreate(self._model, self._options)
        if not self._interpreter:
            self.close()
            raise ModelError(f"{self.path}: TFLite could not build an interpreter for it")
        if input_shape is not None:
            dims = (_i32 * len(input_shape))(*input_shape)
            lib.TfLiteInterpreterResizeInputTensor(self._interpreter, 0, dims,
                                                   len(input_shape))
        if lib.TfLiteInterpreterAllocateTensors(self._interpreter) != 0:
            self.close()
            raise ModelError(f"{self.path}: TFLite could not allocate its tensors")
        self._input = lib.TfLiteInterpreterGetInputTensor(self._interpreter, 0)
        self._output = lib.TfLiteInterpreterGetOutputTensor(self._interpreter, 0)
        if not self._input or not self._output:
            self.close()
            raise ModelError(f"{self.path} has no input or output tensor")
        self.input_shape = tuple(lib.TfLiteTensorDim(self._input, i)
                                 for i in range(lib.TfLiteTensorNumDims(self._input)))
        self._out = np.empty(lib.TfLiteTensorByteSize(self._output) // 4, np.float32)
        self._in_bytes = lib.TfLiteTensorByteSize(self._input)

    def run(self, x: np.ndarray) -> np.ndarray:
        """x: float32 of the input's size. Returns a new float32 array (flat)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.nbytes != self._in_bytes:
            raise ValueError(f"{self.path.name}: input of {x.nbytes} bytes, "
                             f"expected {self._in_bytes}")
        lib = self._lib
        lib.TfLiteTensorCopyFromBuffer(self._input, x.ctypes.data, x.nbytes)
        if lib.TfLiteInterpreterInvoke(self._interpreter) != 0:
            raise ModelError(f"{self.path.name}: inference failed")
        lib.TfLiteTensorCopyToBuffer(self._output, self._out.ctypes.data, self._out.nbytes)
        return self._out.copy()

    def close(self) -> None:
        lib = self._lib
        # The interpreter uses the delegate and the model: delete it first.
        for attr, fn in (("_interpreter", lib.TfLiteInterpreterDelete),
                         ("_delegate", lib.TfLiteXNNPackDelegateDelete),
                         ("_options", lib.TfLiteInterpreterOptionsDelete),
                         ("_model", lib.TfLiteModelDelete)):
            handle = getattr(self, attr, None)
            if handle:
                fn(handle)
                setattr(self, attr, None)

    def __del__(self) -> None:
        self.close()
