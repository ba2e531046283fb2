"""DICOM: de-identification leaves no identifier in written files, manifests or logs."""

from __future__ import annotations

import io
import logging

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from components.data import dicom
from components.data.images import decode_bytes, open_image
from components.data.ingest import ingest
from components.errors import DataError, InputError
from components.workspace import Workspace

STUDY_UID = "1.2.826.0.1.3680043.8.498.11111111111111111111"
SERIES_UID = "1.2.826.0.1.3680043.8.498.22222222222222222222"
IDENTIFIERS = [
    b"DOE",
    b"JANE",
    b"12345",
    b"19700101",
    b"20200304",
    b"St Example Hospital",
    b"1 Main Street",
    b"SMITH",
    b"ACC999",
    b"SECRET-PRIVATE",
    b"555-0100",
    STUDY_UID.encode(),
    SERIES_UID.encode(),
]


@pytest.fixture(autouse=True)
def fixed_uid_salt(monkeypatch):
    # new UIDs are random digits; fix the salt so "12345" cannot appear in them by chance
    monkeypatch.setattr(dicom, "_UID_SALT", "unit-test-salt")


def make_dataset(
    pixels: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    sop_uid: str = "1.2.826.0.1.3680043.8.498.33333333333333333331",
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "12345"
    ds.PatientBirthDate = "19700101"
    ds.OtherPatientIDs = "12345-B"
    ds.PatientAddress = "1 Main Street"
    ds.PatientTelephoneNumbers = "555-0100"
    ds.InstitutionName = "St Example Hospital"
    ds.ReferringPhysicianName = "SMITH^JOHN"
    ds.AccessionNumber = "ACC999"
    ds.StudyDate = "20200304"
    ds.SeriesDate = "20200304"
    ds.Modality = "MR"
    item = Dataset()
    item.ReferencedSOPClassUID = SecondaryCaptureImageStorage
    item.ReferencedSOPInstanceUID = STUDY_UID + ".9"
    item.InstitutionName = "St Example Hospital"
    ds.SourceImageSequence = [item]
    block = ds.private_block(0x0011, "ACME Hospital Systems", create=True)
    block.add_new(0x01, "LO", "SECRET-PRIVATE DOE^JANE")
    if pixels is None:
        pixels = (np.arange(16 * 20, dtype=np.uint16).reshape(16, 20) * 12) % 4000
    ds.set_pixel_data(pixels, photometric, 12 if pixels.dtype == np.uint16 else 8)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_clean(data: bytes) -> None:
    leaked = [ident for ident in IDENTIFIERS if ident in data]
    assert not leaked, f"identifiers survived: {leaked}"


def test_deidentify_removes_identifiers_and_marks_dataset():
    ds = dicom.deidentify(make_dataset())
    assert str(ds.PatientName) == "" and ds.PatientID == "" and "PatientName" in ds
    assert "OtherPatientIDs" not in ds and "InstitutionName" not in ds
    assert "PatientAddress" not in ds and "SeriesDate" not in ds
    assert not ds.StudyDate and not ds.AccessionNumber
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethod
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.StudyInstanceUID != STUDY_UID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert not any(el.tag.is_private for el in ds)
    nested = ds.SourceImageSequence[0]
    assert "InstitutionName" not in nested
    assert nested.ReferencedSOPInstanceUID != STUDY_UID + ".9"
    assert_clean(to_bytes(ds))


def test_pydicom_warnings_do_not_leak_values(tmp_path, caplog):
    ds = make_dataset()
    ds.PatientBirthDate = "DOE^JANE-BIRTH"  # malformed DA: pydicom warns quoting the value
    ds.PatientAge = "DOE^JANE-AGE"
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("pydicom").warning("Invalid value for VR DA: 'DOE^JANE'.")
        data = to_bytes(ds)
        dicom.read_dicom_bytes(data)
        src = tmp_path / "x.dcm"
        src.write_bytes(data)
        assert_clean(dicom.write_deidentified(src, tmp_path / "out").read_bytes())
    assert "Invalid value" in caplog.text
    assert "DOE" not in caplog.text and "JANE" not in caplog.text


def test_replaced_uids_are_consistent_within_a_study():
    one = dicom.deidentify(make_dataset(sop_uid="1.2.3.4.1"))
    two = dicom.deidentify(make_dataset(sop_uid="1.2.3.4.2"))
    assert one.StudyInstanceUID == two.StudyInstanceUID
    assert one.SOPInstanceUID != two.SOPInstanceUID


def test_write_deidentified_file_holds_no_identifier(tmp_path):
    src = tmp_path / "DOE_JANE_12345.dcm"
    make_dataset().save_as(src, enforce_file_format=True)
    assert b"DOE^JANE" in src.read_bytes()  # the test input really carries them
    out = dicom.write_deidentified(src, tmp_path / "out")
    assert out.parent == tmp_path / "out" and out.suffix == ".dcm"
    assert "DOE" not in out.name and "12345" not in out.name
    assert_clean(out.read_bytes())
    reread = pydicom.dcmread(out)
    assert reread.PatientIdentityRemoved == "YES"
    assert np.array_equal(reread.pixel_array, make_dataset().pixel_array)


def test_read_dicom_bytes_windowing_and_rescale():
    pixels = np.array([[0, 1000, 2000, 4000]], dtype=np.uint16)
    ds = make_dataset(pixels)
    ds.WindowCenter = 2000
    ds.WindowWidth = 2000
    _, image = dicom.read_dicom_bytes(to_bytes(ds))
    out = np.asarray(image)[0]
    assert image.mode == "L"
    assert out[0] == 0 and out[1] == 0 and out[3] == 255 and 120 < out[2] < 135
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -1000  # values become -1000, 1000, 3000, 7000
    ds.WindowCenter = 3000
    _, image = dicom.read_dicom_bytes(to_bytes(ds))
    out = np.asarray(image)[0]
    assert out[0] == 0 and out[1] == 0 and 120 < out[2] < 135 and out[3] == 255


def test_monochrome1_is_inverted():
    pixels = np.array([[0, 255]], dtype=np.uint8)
    _, normal = dicom.read_dicom_bytes(to_bytes(make_dataset(pixels, "MONOCHROME2")))
    _, inverted = dicom.read_dicom_bytes(to_bytes(make_dataset(pixels, "MONOCHROME1")))
    assert np.asarray(normal).tolist() == [[0, 255]]
    assert np.asarray(inverted).tolist() == [[255, 0]]


def test_rgb_dicom():
    pixels = np.zeros((4, 5, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    _, image = dicom.read_dicom_bytes(to_bytes(make_dataset(pixels, "RGB")))
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [200, 0, 0]


def test_multiframe_and_garbage_are_refused():
    frames = np.zeros((3, 4, 4), dtype=np.uint8)
    with pytest.raises(InputError, match="3 frames"):
        decode_bytes(to_bytes(make_dataset(frames)))
    with pytest.raises(InputError):
        decode_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    ds = make_dataset()
    del ds.PixelData
    with pytest.raises(DataError, match="no pixel data"):
        dicom.dataset_to_image(ds)


def test_decode_bytes_and_open_image_accept_dicom(tmp_path):
    image = decode_bytes(to_bytes(make_dataset()))
    assert image.format == "DICOM" and image.size == (20, 16)
    path = tmp_path / "scan.dcm"
    path.write_bytes(to_bytes(make_dataset()))
    assert open_image(str(path)).size == (20, 16)


def test_dicom_ingest_records_only_deidentified_copies(tmp_path, caplog):
    root = tmp_path / "dicoms"
    for split in ("train", "test"):
        for label in ("benign", "malignant"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                value = (
                    40 * i + (100 if label == "malignant" else 0) + (7 if split == "test" else 0)
                )
                ds = make_dataset(
                    np.full((8, 8), value, np.uint8), sop_uid=f"1.2.3.{len(split)}.{len(label)}.{i}"
                )
                ds.save_as(folder / f"DOE_JANE_12345_{i}.dcm", enforce_file_format=True)
    (root / "train" / "benign" / "notes.txt").write_text("DOE JANE 12345")
    workspace = Workspace(tmp_path / "ws")
    with caplog.at_level(logging.DEBUG):
        frame = ingest("dicom", root, ["benign", "malignant"], workspace)
    assert len(frame) == 8
    assert (frame["decode_error"] == "").all()
    assert set(frame["given_split"]) == {"train", "test"}
    assert set(frame["format"]) == {"dicom"}
    for source in frame["source"]:
        assert source.startswith(str(workspace.cache))
        assert "DOE" not in source and "12345" not in source
        with open(source, "rb") as handle:
            assert_clean(handle.read())
    for ident in ("DOE", "JANE", "12345", "St Example"):
        assert ident not in caplog.text
    # manifest parquet-able and contains no identifier either
    assert not frame.astype(str).apply(lambda col: col.str.contains("DOE|JANE|12345")).any().any()


def test_unreadable_dicom_becomes_a_row_without_its_name(tmp_path):
    root = tmp_path / "d" / "benign"
    root.mkdir(parents=True)
    make_dataset().save_as(root / "ok.dcm", enforce_file_format=True)
    (root / "DOE_JANE.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 10)
    frame = ingest("dicom", tmp_path / "d", None, Workspace(tmp_path / "ws"))
    assert len(frame) == 2
    bad = frame[frame["decode_error"] != ""]
    assert len(bad) == 1
    assert "DOE" not in bad["source"].iloc[0] and "DOE" not in bad["decode_error"].iloc[0]
