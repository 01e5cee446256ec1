"""One site's data: fedforge calls load_site for every site of a simulation (data.sites) and
for a deployed site's own folder (fedforge client --data PATH). Return arrays (x, y), a
fedforge ArrayDataset, or a torch Dataset of (x, y) pairs."""

from __future__ import annotations

from fedforge import ArrayDataset, Site, read_data

SIZE = [8, 8]  # every image is resized to height x width (match models.py)


def load_site(site: Site) -> ArrayDataset:
    """The site's image folder: one subfolder per class, named by the class number."""
    if site.path is None:
        raise ValueError("this project reads folders: name them in data.sites or with --data")
    return read_data(site.path, image_size=SIZE, channels=1)
