"""Hospital interoperability: DICOM photographs in, DICOM SR and FHIR out, DICOMweb round trips (``[dicom]`` extra)."""
