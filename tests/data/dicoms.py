"""DICOM test files written with pydicom (and pydicom's own bundled test files): nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bundled(name: str) -> Path:
    """A test file shipped in pydicom's wheel (never downloaded: ``download=False``)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's wheel should ship {name}"
    return Path(path)


def write_dicom(path: str | Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", slope: float | None = None,
                intercept: float | None = None, window: tuple | None = None, bits_stored: int | None = None,
                syntax: str | None = None, encapsulated: bytes | None = None) -> Path:
    """A DICOM file of ``pixels`` (H, W) or (frames, H, W), uint8/uint16/int16, written with pydicom.

    ``window``: (centre, width) or ((c1, c2), (w1, w2)) for a multi-valued one. ``syntax`` with
    ``encapsulated``: a compressed transfer syntax whose pixel data are those bytes (for a file
    whose decoder is not installed: the reader must skip it before decoding anything)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = list(window[0]) if isinstance(window[0], tuple) else window[0], (
            list(window[1]) if isinstance(window[1], tuple) else window[1])
    if encapsulated is not None:
        ds.PixelData = encapsulate([encapsulated] * frames)
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)
