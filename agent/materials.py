"""What the specimen is: the projected unit cell, its sites and what they hold.

A :class:`Material` is the small description the column finder needs to turn
positions into sites: the 2-D cell of the zone-axis projection (lengths in nm,
angle in degrees), every column site in fractional coordinates of that cell
with the atoms per cell it holds, and whether the material is polar (which site
carries the polarization). Species names in figures and reports come from it,
and so does the expected HAADF contrast of each site (the sum of Z**1.7 over
its atoms), which fixes which sublattice the lattice phase refers to.

Two materials are built in (:data:`MATERIALS`): the default Sm-doped BiFeO3
viewed along [001], and SrTiO3 [001] as a non-polar cubic perovskite. Others are
given in the session config (``columns.material``) as a mapping with the same keys.

Examples
--------
>>> bfo = material_named("BiFeO3-001")
>>> [site.name for site in bfo.sites]
['A', 'B', 'O1', 'O2']
>>> round(bfo.relative_contrast()["B"], 3)
0.158
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from agent.config import StrictModel
from agent.errors import ConfigError

HAADF_EXPONENT = 1.7
"""HAADF column contrast grows as Z**1.7 summed over the column's atoms."""

ATOMIC_NUMBER: dict[str, int] = {
    "O": 8, "F": 9, "Mg": 12, "Al": 13, "Si": 14, "Ca": 20, "Sc": 21, "Ti": 22, "V": 23, "Cr": 24,
    "Mn": 25, "Fe": 26, "Co": 27, "Ni": 28, "Cu": 29, "Zn": 30, "Ga": 31, "Sr": 38, "Y": 39, "Zr": 40,
    "Nb": 41, "Ru": 44, "Ba": 56, "La": 57, "Ce": 58, "Pr": 59, "Nd": 60, "Sm": 62, "Gd": 64, "Dy": 66,
    "Hf": 72, "Ta": 73, "W": 74, "Ir": 77, "Pb": 82, "Bi": 83,
}  # fmt: skip
"""Atomic numbers of the elements a material description may name."""

SiteRole = Literal["A", "B", "O"]
ROLE_CODES: dict[str, int] = {"A": 0, "B": 1, "O": 2}
"""Species code of each site role in :attr:`agent.columns.Columns.species`."""


class Site(StrictModel):
    """One column site of the projected cell.

    Parameters
    ----------
    name : str
        Short name used in tables ("A", "B", "O1").
    role : {"A", "B", "O"}
        What the finder treats it as: the bright cation site, the second cation
        site, or a light-anion (pure oxygen) site that is never a cation column.
    position : tuple of float
        Fractional coordinates ``(u, v)`` in the projected cell.
    atoms : dict of str to float
        Atoms of each element per cell along the beam (for example ``{"Fe": 1, "O": 1}``).
    label : str
        Species label shown to people ("Bi/Sm", "Fe").
    """

    name: str = Field(min_length=1, max_length=12)
    role: SiteRole
    position: tuple[float, float]
    atoms: dict[str, float]
    label: str = Field(min_length=1, max_length=24)

    @model_validator(mode="after")
    def _known_elements(self) -> Site:
        unknown = sorted(set(self.atoms) - set(ATOMIC_NUMBER))
        if unknown:
            raise ValueError(
                f"site {self.name}: unknown element(s) {unknown}; known: {sorted(ATOMIC_NUMBER)}"
            )
        if not self.atoms or any(count <= 0 for count in self.atoms.values()):
            raise ValueError(f"site {self.name}: atoms must name at least one element with a positive count")
        return self

    @property
    def scattering(self) -> float:
        """Expected HAADF contrast of the column, sum of count x Z**1.7 (arbitrary units)."""
        return sum(count * ATOMIC_NUMBER[element] ** HAADF_EXPONENT for element, count in self.atoms.items())


class Material(StrictModel):
    """A crystalline material in one zone-axis projection.

    Parameters
    ----------
    name : str
        Identifier, for example ``"BiFeO3-001"``.
    formula : str
        Chemical formula shown in reports.
    zone_axis : str
        Viewing direction, for example ``"[001]"``.
    a_nm, b_nm : float
        Lengths of the projected cell vectors, nanometres. ``a_nm`` is the A-A spacing
        the lattice-spacing estimate looks for.
    gamma_deg : float
        Angle between the two cell vectors, degrees.
    sites : list of Site
        Every column site; exactly one has role ``"A"``.
    polar : bool
        Whether the material is ferroelectric (polarization and domain maps make sense).
    polarization_site : str, optional
        Name of the site whose shift from the centre of its A neighbours is the polarization.
    substituent : str, optional
        Element that replaces the A cation (Sm in Sm-BFO): dimmer A columns are reported as such.
    """

    name: str = Field(min_length=1, max_length=40)
    formula: str = Field(min_length=1, max_length=40)
    zone_axis: str = "[001]"
    a_nm: float = Field(gt=0.1, lt=3.0)
    b_nm: float | None = Field(None, gt=0.1, lt=3.0)
    gamma_deg: float = Field(90.0, gt=30.0, lt=150.0)
    sites: list[Site] = Field(min_length=2)
    polar: bool = False
    polarization_site: str | None = None
    substituent: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Material:
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"material {self.name}: site names must be unique, got {names}")
        roles = [site.role for site in self.sites]
        if roles.count("A") != 1:
            raise ValueError(f"material {self.name}: exactly one site must have role 'A', got {roles}")
        if self.polar and self.polarization_site not in names:
            raise ValueError(
                f"material {self.name}: a polar material needs polarization_site, one of {names} "
                f"(got {self.polarization_site!r})"
            )
        if self.substituent is not None and self.substituent not in ATOMIC_NUMBER:
            raise ValueError(f"material {self.name}: unknown substituent {self.substituent!r}")
        return self

    @property
    def cell_b_nm(self) -> float:
        """Length of the second cell vector, nanometres (``a_nm`` for a square cell)."""
        return self.a_nm if self.b_nm is None else self.b_nm

    def site(self, role: SiteRole) -> Site | None:
        """The first site with this role, or None."""
        return next((site for site in self.sites if site.role == role), None)

    def label(self, role: SiteRole) -> str:
        """Species label of a role for figures ("Bi/Sm"); the role itself when the material has none."""
        site = self.site(role)
        return role if site is None else site.label

    def relative_contrast(self) -> dict[str, float]:
        """Expected HAADF contrast of every site over that of the A site."""
        a_site = self.site("A")
        assert a_site is not None  # guaranteed by the validator
        return {site.name: site.scattering / a_site.scattering for site in self.sites}

    def structure_phase(self, h: int, k: int) -> float:
        """Phase of the projected structure factor at reflection ``(h, k)``, radians.

        The Bragg-filtered image at ``(h, k)`` has this phase at the cell origin; the
        lattice fit subtracts it so that fractional coordinates refer to the cell.
        """
        real = imaginary = 0.0
        for site in self.sites:
            angle = -2.0 * math.pi * (h * site.position[0] + k * site.position[1])
            real += site.scattering * math.cos(angle)
            imaginary += site.scattering * math.sin(angle)
        return math.atan2(imaginary, real)


_BFO = Material(
    name="BiFeO3-001",
    formula="(Bi,Sm)FeO3",
    zone_axis="[001]",
    a_nm=0.396,
    sites=[
        Site(name="A", role="A", position=(0.0, 0.0), atoms={"Bi": 1}, label="Bi/Sm"),
        Site(name="B", role="B", position=(0.5, 0.5), atoms={"Fe": 1, "O": 1}, label="Fe"),
        Site(name="O1", role="O", position=(0.5, 0.0), atoms={"O": 1}, label="O"),
        Site(name="O2", role="O", position=(0.0, 0.5), atoms={"O": 1}, label="O"),
    ],
    polar=True,
    polarization_site="B",
    substituent="Sm",
)

_STO = Material(
    name="SrTiO3-001",
    formula="SrTiO3",
    zone_axis="[001]",
    a_nm=0.3905,
    sites=[
        Site(name="A", role="A", position=(0.0, 0.0), atoms={"Sr": 1}, label="Sr"),
        Site(name="B", role="B", position=(0.5, 0.5), atoms={"Ti": 1, "O": 1}, label="Ti"),
        Site(name="O1", role="O", position=(0.5, 0.0), atoms={"O": 1}, label="O"),
        Site(name="O2", role="O", position=(0.0, 0.5), atoms={"O": 1}, label="O"),
    ],
    polar=False,
)

MATERIALS: dict[str, Material] = {material.name: material for material in (_BFO, _STO)}
"""Built-in materials by name; ``"BiFeO3-001"`` is the default."""

DEFAULT_MATERIAL = "BiFeO3-001"


def material_named(name: str) -> Material:
    """A built-in material by name.

    Parameters
    ----------
    name : str
        One of :data:`MATERIALS` (case-insensitive).

    Returns
    -------
    Material

    Raises
    ------
    ConfigError
        If no built-in material has that name.
    """
    for known, material in MATERIALS.items():
        if known.lower() == name.lower():
            return material
    raise ConfigError(
        f"unknown material {name!r}; built in: {', '.join(MATERIALS)} (or describe it in the config)"
    )


def resolve_material(material: str | Material | None) -> Material:
    """A material from a name, a description or None (the default, BiFeO3 [001])."""
    if material is None:
        return MATERIALS[DEFAULT_MATERIAL]
    if isinstance(material, Material):
        return material
    return material_named(material)
