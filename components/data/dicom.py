"""DICOM reading and de-identification.

`deidentify` follows the spirit of the DICOM PS3.15 Annex E *Basic Application Level
Confidentiality Profile*: identifying attributes are removed (action X) or emptied where the
IOD requires them to be present (action Z), UIDs are replaced by new ones that stay consistent
within one process (action U), every private tag is removed, and the dataset records that
this was done (Patient Identity Removed = YES, De-identification Method, code sequence).

Limits (documented, not solved here): identifiers burned into the pixels are not detected
beyond the Burned In Annotation flag (logged as a warning), and free-text attributes not in
the list below that a vendor misuses for identifiers survive unless they are private tags.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import secrets
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from components.errors import DataError

log = logging.getLogger(__name__)


class _RedactQuotedValues(logging.Filter):
    """pydicom's warnings quote attribute values (possibly identifiers): redact them."""

    _QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._QUOTED.sub("'<redacted>'", record.getMessage())
        record.args = ()
        return True


logging.getLogger("pydicom").addFilter(_RedactQuotedValues())


# pydicom also repeats those warnings through `warnings` (to stderr, unredacted): silence them
# here once (a per-call catch_warnings is not thread-safe); the redacted log record remains.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


DEIDENTIFICATION_METHOD = "oncoflow PS3.15 basic profile: X/Z/U, private tags removed"

# Attributes the IOD requires (type 1/2): keep the element, empty its value (action Z).
BLANK_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "ContentCreatorName",
    "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest",
)

# Attributes removed outright (action X).
REMOVE_KEYWORDS: tuple[str, ...] = (
    # patient
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientComments",
    "PatientInsurancePlanCodeSequence",
    "PatientReligiousPreference",
    "PatientState",
    "EthnicGroup",
    "Occupation",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "CountryOfResidence",
    "RegionOfResidence",
    "IssuerOfPatientID",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesDescription",
    "CurrentPatientLocation",
    "PregnancyStatus",
    "LastMenstrualDate",
    "SmokingStatus",
    "MedicalAlerts",
    "Allergies",
    "SpecialNeeds",
    "PatientSexNeutered",
    # people and places
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "OperatorsName",
    "OperatorIdentificationSequence",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "PersonName",
    "VerifyingObserverName",
    "VerifyingObserverSequence",
    "PerformedStationName",
    "PerformedLocation",
    "ScheduledStationName",
    "ScheduledProcedureStepLocation",
    # dates and times of the encounter
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "OverlayDate",
    "OverlayTime",
    "CurveDate",
    "CurveTime",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "AdmittingDate",
    "AdmittingTime",
    "DateOfLastCalibration",
    "TimeOfLastCalibration",
    # free text and request identifiers
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "RequestAttributesSequence",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "PerformedProcedureStepID",
    "PerformedProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ReasonForStudy",
    "RequestingService",
    "InterpretationText",
    "TextComments",
    "TextString",
    "DerivationDescription",
    "IdentifyingComments",
    "ReferencedPatientSequence",
    "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence",
    "OriginalAttributesSequence",
    "ModifiedAttributesSequence",
    "DigitalSignaturesSequence",
)

# Attributes whose UID value is replaced (action U), consistently within this process.
UID_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "SynchronizationFrameOfReferenceUID",
    "ReferencedSOPInstanceUID",
    "ReferencedFrameOfReferenceUID",
    "IrradiationEventUID",
    "CreatorVersionUID",
    "InstanceCreatorUID",
    "StorageMediaFileSetUID",
    "UID",
    "ConcatenationUID",
    "DimensionOrganizationUID",
    "TargetUID",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID",
)

# Per-process secret: replaced UIDs are consistent for one ingest (a study keeps one new
# Study UID) but cannot be recomputed from the original UID by anyone else.
_UID_SALT = secrets.token_hex(16)


def _new_uid(original: str) -> str:
    return generate_uid(entropy_srcs=[_UID_SALT, str(original)])


def _scrub(ds: Dataset) -> None:
    """Apply the X/Z/U actions to `ds` and, recursively, to every nested sequence item."""
    for keyword in REMOVE_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword in BLANK_KEYWORDS:
        if keyword in ds:
            ds[keyword].value = ""
    for keyword in UID_KEYWORDS:
        if keyword in ds and ds[keyword].value:
            value = ds[keyword].value
            if isinstance(value, pydicom.multival.MultiValue | list):
                ds[keyword].value = [_new_uid(v) for v in value]
            else:
                ds[keyword].value = _new_uid(value)
    for element in list(ds):
        if element.VR == "SQ" and isinstance(element.value, Sequence):
            for item in element.value:
                _scrub(item)


def deidentify(ds: Dataset) -> Dataset:
    """Remove patient identifiers from `ds` in place and return it.

    Private tags are removed, identifying attributes removed or emptied, UIDs replaced (the
    file meta Media Storage SOP Instance UID follows the new SOP Instance UID).
    """
    ds.remove_private_tags()
    _scrub(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.get(
            "SOPInstanceUID", _new_uid(meta.MediaStorageSOPInstanceUID)
        )
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        log.warning("a DICOM declares burned-in annotation: its pixels may show identifiers")
    return ds


def _read(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for malformed input
        raise DataError(f"not a readable DICOM file ({type(exc).__name__})") from exc


def read_dicom_bytes(data: bytes) -> tuple[Dataset, Image.Image]:
    """Parse DICOM bytes, de-identify them first, then render the image as 8-bit."""
    ds = deidentify(_read(data))
    return ds, dataset_to_image(ds)


def _window_to_uint8(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI windowing (PS3.3 C.11.2.1.2) straight to 0..255."""
    width = max(float(width), 1.0)
    low = center - 0.5 - (width - 1) / 2
    scaled = (arr - low) / (width - 1 if width > 1 else 1.0)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    low, high = float(np.min(arr)), float(np.max(arr))
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return ((arr - low) / (high - low) * 255.0).round().astype(np.uint8)


def _first(value) -> float:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)


def dataset_to_image(ds: Dataset) -> Image.Image:
    """Render a single-frame DICOM as an 8-bit PIL image ('L' or 'RGB').

    Grayscale: modality rescale (slope/intercept or LUT), then the first VOI window if
    present (else the VOI LUT, else min-max), MONOCHROME1 inverted so bright means dense.
    Multi-frame datasets are refused: which frame to diagnose is not ours to guess.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

    if "PixelData" not in ds:
        raise DataError("DICOM has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"DICOM has {frames} frames; only single-frame images are supported")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise DataError(f"cannot decode DICOM pixel data ({name}): {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if arr.dtype != np.uint8:
            arr = _minmax_to_uint8(arr)
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim != 2:
        raise DataError(f"unsupported DICOM pixel array shape {arr.shape}")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window_to_uint8(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    elif "VOILUTSequence" in ds:
        out = _minmax_to_uint8(apply_voi(values, ds))
    else:
        out = _minmax_to_uint8(values)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out)


def content_name(data: bytes) -> str:
    """A file name derived from the content only, so it cannot carry an identifier."""
    return hashlib.sha256(data).hexdigest()[:32]


def write_deidentified(src_path: str | Path, out_dir: str | Path) -> Path:
    """De-identify the DICOM at `src_path` into `out_dir/<content hash>.dcm` and return it.

    The output name is a hash of the original bytes, never the original file name (which
    may hold a patient name). An existing output of the same name is kept as is.
    """
    data = Path(src_path).read_bytes()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{content_name(data)}.dcm"
    if target.exists():
        return target
    ds = deidentify(_read(data))
    save_dataset(ds, target)
    return target


def save_dataset(ds: Dataset, target: Path) -> None:
    """Write `ds` as a conformant DICOM file atomically (temp file then rename)."""
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    tmp = target.with_suffix(f".tmp{secrets.token_hex(4)}")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(target)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write de-identified DICOM: {exc}") from exc
