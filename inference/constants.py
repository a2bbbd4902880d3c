"""Names shared by every part of the detector."""

CLASSES = ("any", "intraparenchymal", "intraventricular", "subdural", "epidural", "subarachnoid")
SUBTYPES = CLASSES[1:]
CLASS_LABELS = {
    "any": "Any haemorrhage",
    "intraparenchymal": "Intraparenchymal",
    "intraventricular": "Intraventricular",
    "subdural": "Subdural",
    "epidural": "Epidural",
    "subarachnoid": "Subarachnoid",
}
# bleed sizes of `ich phantom`, smallest first (inference/phantom.py: _TOTAL_ML)
SIZES = ("tiny", "small", "medium", "large")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AIR_HU = -1024.0
