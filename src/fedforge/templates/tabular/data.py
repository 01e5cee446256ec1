"""One site's data: fedforge calls load_site for every site of a simulation (data.sites) and
for a deployed site's own file (fedforge client --data PATH). Return arrays (x, y), a
fedforge ArrayDataset, or a torch Dataset of (x, y) pairs."""

from __future__ import annotations

from fedforge import ArrayDataset, Site, read_data

LABEL = "diagnosis"  # the label column
CLASSES = ["B", "M"]  # its values in class order: benign, malignant


def load_site(site: Site) -> ArrayDataset:
    """The site's CSV file: every column but the label is a feature, standardized with the
    site's own mean and standard deviation (learned here, never shared)."""
    if site.path is None:
        raise ValueError("this project reads files: name them in data.sites or with --data")
    return read_data(site.path, label=LABEL, labels=CLASSES)
