"""A procedural world with exact metric depth: photo-like scenes rendered by ray casting in torch.

    python -m data.synthetic --out worlds/train --count 2000 --size 256x256 --seed 0 --world train
    python -m data.synthetic --out worlds/test --count 200 --size 256x256 --seed 0 --world test

Each scene: a pinhole camera (random height, pitch, roll and field of view) in a walled yard on a
textured ground, with boxes, spheres and cylinders standing on the ground and hiding each other;
Lambertian shading from a random sun plus ambient light, cast shadows, haze that grows with
distance, and sky above the walls. Textures are fixed in world coordinates (metres per tile), so
their density falls with distance, as in a photo. The `train` and `test` worlds draw from disjoint
textures (`TEXTURE_SPLIT`: different photos, procedural families and seeds) and disjoint layout
seeds, so a model scored on `test` has seen none of its surfaces.

Each sample is written as `images/NNNNNN.png` (RGB), `depth/NNNNNN.npy` (float32 z-depth in
metres, 0 where invalid: sky and anything beyond `MAX_DEPTH`) and `mask/NNNNNN.png` (255 valid),
the layout `trainer.evaluate --labeled` and `trainer.benchmark --suite synthetic` read. A sample
depends only on (seed, world, index), so any number of worker processes writes the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.cli import ArgumentParser
from data.teacher_cache import write_json_atomically

MIN_DEPTH, MAX_DEPTH = 0.1, 40.0  # metres: the valid range written into every mask
WORLDS = ("train", "test")
SAMPLES = Path(__file__).resolve().parent / "samples"
TEXTURE_SIZE = 256
MIP_LEVELS = 6  # 256 .. 8 texels: texture detail fades with distance instead of aliasing
FORMAT_VERSION = 1  # in world.json: files written by another version are not mixed with these

# Which surfaces each world may use. Photos are the project's own samples (data/samples/README.md);
# procedural families are drawn with seeds from disjoint ranges.
TEXTURE_SPLIT = {
    "train": {"photos": ("astronaut.jpg", "coffee.jpg", "hubble_deep_field.jpg", "phone_01.jpg", "phone_02.jpg",
                         "rocket.jpg"),
              "families": ("noise", "checker", "stripes", "bricks", "wood"), "seeds": range(0, 40)},
    "test": {"photos": ("chelsea.jpg", "phone_03.jpg"),
             "families": ("noise", "tiles", "dots", "marble", "bricks"), "seeds": range(1000, 1024)},
}


# --- the camera ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Camera:
    """World frame: x right, y up, z forward (before pitch and roll); the camera stands at (0, height, 0).
    `pitch` > 0 looks down, `roll` turns the image clockwise; `hfov` is the horizontal field of view."""

    height: float
    pitch: float  # radians
    roll: float  # radians
    hfov: float  # radians
    width: int
    height_px: int

    @property
    def focal(self) -> float:
        return self.width / 2 / math.tan(self.hfov / 2)

    def axes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(right, up, forward) in world coordinates."""
        sp, cp = math.sin(self.pitch), math.cos(self.pitch)
        forward = torch.tensor([0.0, -sp, cp])
        right0, up0 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, cp, sp])
        sr, cr = math.sin(self.roll), math.cos(self.roll)
        return cr * right0 - sr * up0, sr * right0 + cr * up0, forward

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> origin (3,), directions (H*W, 3) through the pixel centres, scaled so that their
        component along the optical axis is 1: the distance along a ray is then its z-depth."""
        right, up, forward = self.axes()
        u = (torch.arange(self.width, dtype=torch.float32) + 0.5 - self.width / 2) / self.focal
        v = (torch.arange(self.height_px, dtype=torch.float32) + 0.5 - self.height_px / 2) / self.focal
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        directions = forward + uu.reshape(-1, 1) * right - vv.reshape(-1, 1) * up
        return torch.tensor([0.0, self.height, 0.0]), directions

    def pixels_that_may_see(self, centre: torch.Tensor, radius: float) -> Optional[torch.Tensor]:
        """Flat indices of the pixels whose rays may meet the sphere (centre, radius): the window
        its camera-frame bounding cube projects to; None (all of them) if it reaches the camera."""
        right, up, forward = self.axes()
        relative = centre - torch.tensor([0.0, self.height, 0.0])
        x, y, z = float(relative @ right), float(relative @ up), float(relative @ forward)
        if z - radius < 1e-3:
            return None
        depths = (z - radius, z + radius)
        us = [side / depth for side in (x - radius, x + radius) for depth in depths]
        vs = [-side / depth for side in (y - radius, y + radius) for depth in depths]  # rows grow downwards
        c0 = max(0, math.floor(min(us) * self.focal + self.width / 2 - 0.5))
        c1 = min(self.width - 1, math.ceil(max(us) * self.focal + self.width / 2 - 0.5))
        r0 = max(0, math.floor(min(vs) * self.focal + self.height_px / 2 - 0.5))
        r1 = min(self.height_px - 1, math.ceil(max(vs) * self.focal + self.height_px / 2 - 0.5))
        if c0 > c1 or r0 > r1:
            return torch.empty(0, dtype=torch.long)
        return (torch.arange(r0, r1 + 1)[:, None] * self.width + torch.arange(c0, c1 + 1)).reshape(-1)


# --- the shapes: each returns (distance, normal) per ray, inf where missed ---------------------------
# Rays start at `o`, one point (3,) for the camera's rays or one per ray (N, 3) for shadow rays; every
# shape is convex, so a ray leaving a surface it lies on never meets that surface again.

INF = float("inf")
_ONES = torch.ones(3)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of (N, 3) tensors, either of which may be one (3,) vector (a matrix
    product: 4x faster than .sum(1) on the CPU)."""
    if b.dim() == 1:
        return a @ b
    return (a * b) @ _ONES if a.dim() == 2 else b @ a


def _first_positive(*candidates: torch.Tensor) -> torch.Tensor:
    t = torch.stack(candidates)
    return torch.where(t > 1e-4, t, torch.full_like(t, INF)).amin(0)


def hit_ground(o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = -o[..., 1] / d[:, 1]
    t = torch.where((d[:, 1] < 0) & (t > 0), t, torch.full_like(t, INF))
    return t, torch.tensor([0.0, 1.0, 0.0]).expand_as(d)


def hit_wall(o: torch.Tensor, d: torch.Tensor, point: torch.Tensor, normal: torch.Tensor, top: float):
    """A vertical plane through `point` facing `normal` (towards the camera), from the ground to `top`."""
    denominator = d @ normal
    t = ((point - o) @ normal) / denominator
    y = o[..., 1] + t * d[:, 1]
    t = torch.where((denominator < 0) & (t > 0) & (y >= 0) & (y <= top), t, torch.full_like(t, INF))
    return t, normal.expand_as(d)


def hit_sphere(o: torch.Tensor, d: torch.Tensor, centre: torch.Tensor, radius: float):
    oc = o - centre
    a = dot(d, d)
    b = 2 * dot(d, oc)
    c = dot(oc, oc) - radius ** 2
    disc = b * b - 4 * a * c
    root = torch.sqrt(disc.clamp(min=0))
    t = _first_positive((-b - root) / (2 * a), (-b + root) / (2 * a))
    t = torch.where(disc >= 0, t, torch.full_like(t, INF))
    normal = (o + t[:, None].clamp(max=1e6) * d - centre) / radius
    return t, normal


def _yaw_matrix(yaw: float) -> torch.Tensor:
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # world -> local (rows: local axes)


def hit_box(o: torch.Tensor, d: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, yaw: float):
    """An upright box turned by `yaw` about the vertical, by the slab method in its own frame."""
    rotation = _yaw_matrix(yaw)
    ol, dl = (o - centre) @ rotation.T, d @ rotation.T
    safe = torch.where(dl.abs() < 1e-9, torch.full_like(dl, 1e-9), dl)
    t1, t2 = (-half - ol) / safe, (half - ol) / safe
    near, far = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = near.max(1)
    t_far = far.amin(1)
    t = torch.where((t_near <= t_far) & (t_near > 1e-4), t_near, torch.full_like(t_near, INF))
    local_normal = F.one_hot(axis, 3).float() * -torch.sign(dl.gather(1, axis[:, None]))
    return t, local_normal @ rotation


def hit_cylinder(o: torch.Tensor, d: torch.Tensor, base: torch.Tensor, radius: float, top: float):
    """An upright cylinder standing on the ground at `base` (x, 0, z), closed by a flat top."""
    ox, oz = o[..., 0] - base[0], o[..., 2] - base[2]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (d[:, 0] * ox + d[:, 2] * oz)
    c = ox ** 2 + oz ** 2 - radius ** 2
    disc = b * b - 4 * a * c
    side = (-b - torch.sqrt(disc.clamp(min=0))) / (2 * a.clamp(min=1e-12))
    y = o[..., 1] + side * d[:, 1]
    side = torch.where((disc >= 0) & (side > 1e-4) & (y >= 0) & (y <= top), side, torch.full_like(side, INF))
    cap = (top - o[..., 1]) / torch.where(d[:, 1].abs() < 1e-9, torch.full_like(d[:, 1], 1e-9), d[:, 1])
    px, pz = ox + cap * d[:, 0], oz + cap * d[:, 2]
    cap = torch.where((cap > 1e-4) & (px ** 2 + pz ** 2 <= radius ** 2), cap, torch.full_like(cap, INF))
    t = torch.minimum(side, cap)
    point = o + t[:, None].clamp(max=1e6) * d
    radial = torch.stack([point[:, 0] - base[0], torch.zeros_like(t), point[:, 2] - base[2]], 1) / radius
    normal = torch.where((cap <= side)[:, None], torch.tensor([0.0, 1.0, 0.0]).expand_as(d), radial)
    return t, normal


# --- the scene ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Surface:
    kind: str  # ground | wall | box | sphere | cylinder
    params: tuple  # the shape's numbers (see `_hit`)
    texture: int  # index into the world's texture bank
    tile: float  # metres per texture tile
    offset: tuple[float, float]  # texture offset, in tiles


@dataclass(frozen=True)
class Scene:
    camera: Camera
    surfaces: tuple[Surface, ...]
    sun: tuple[float, float, float]  # unit vector towards the sun
    sun_strength: float
    ambient: float
    haze: float  # extinction per metre
    haze_colour: tuple[float, float, float]
    sky: tuple[tuple[float, float, float], tuple[float, float, float]]  # horizon, zenith


def _hit(surface: Surface, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = surface.params
    if surface.kind == "ground":
        return hit_ground(o, d)
    if surface.kind == "wall":
        return hit_wall(o, d, torch.tensor(p[0:3]), torch.tensor(p[3:6]), p[6])
    if surface.kind == "sphere":
        return hit_sphere(o, d, torch.tensor(p[0:3]), p[3])
    if surface.kind == "box":
        return hit_box(o, d, torch.tensor(p[0:3]), torch.tensor(p[3:6]), p[6])
    if surface.kind == "cylinder":
        return hit_cylinder(o, d, torch.tensor(p[0:3]), p[3], p[4])
    raise ValueError(f"unknown surface {surface.kind!r}")


def _bounds(surface: Surface) -> Optional[tuple[torch.Tensor, float]]:
    """A sphere around a shape (None for the ground and walls): rays that miss it skip the exact test."""
    p = surface.params
    if surface.kind == "sphere":
        return torch.tensor(p[0:3]), p[3]
    if surface.kind == "box":
        return torch.tensor(p[0:3]), math.sqrt(p[3] ** 2 + p[4] ** 2 + p[5] ** 2)
    if surface.kind == "cylinder":
        return torch.tensor([p[0], p[4] / 2, p[2]]), math.sqrt(p[3] ** 2 + (p[4] / 2) ** 2)
    return None


def intersect(camera: Camera, surfaces, o: torch.Tensor,
              d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (distance, index of the surface hit (-1: none), normal) of the nearest hit per camera ray.
    A shape is tested only on the pixels its bounding sphere may cover."""
    t = torch.full((d.shape[0],), INF)
    which = torch.full((d.shape[0],), -1, dtype=torch.long)
    normal = torch.zeros_like(d)
    for index, surface in enumerate(surfaces):
        bounds = _bounds(surface)
        rows = None if bounds is None else camera.pixels_that_may_see(*bounds)
        if rows is None:  # every ray
            t_s, n_s = _hit(surface, o, d)
            nearer = t_s < t
            t, which = torch.where(nearer, t_s, t), torch.where(nearer, index, which)
            normal = torch.where(nearer[:, None], n_s, normal)
        elif rows.numel():
            t_s, n_s = _hit(surface, o, d[rows])
            nearer = t_s < t[rows]
            rows = rows[nearer]
            t[rows], which[rows], normal[rows] = t_s[nearer], index, n_s[nearer]
    return t, which, normal


def _planar_uv(point: torch.Tensor, normal: torch.Tensor, surface: Surface) -> torch.Tensor:
    """Texture coordinates in tiles, from the world position on the plane the normal faces most."""
    if surface.kind == "box":  # in the box's own frame, so that its faces keep their texture when it turns
        rotation = _yaw_matrix(surface.params[6])
        point, normal = (point - torch.tensor(surface.params[0:3])) @ rotation.T, normal @ rotation.T
    if surface.kind == "ground":
        uv = point[:, 0::2]
    elif surface.kind == "wall":  # along the wall, and up
        along = torch.linalg.cross(torch.tensor(surface.params[3:6]), torch.tensor([0.0, 1.0, 0.0]))
        uv = torch.stack([point @ along, point[:, 1]], 1)
    elif surface.kind == "cylinder":
        base = torch.tensor(surface.params[0:3])
        angle = torch.atan2(point[:, 2] - base[2], point[:, 0] - base[0]) * surface.params[3]
        side = torch.stack([angle, point[:, 1]], 1)
        top = torch.stack([point[:, 0], point[:, 2]], 1)
        uv = torch.where(normal[:, 1:2] > 0.5, top, side)
    else:
        axis = normal.abs().argmax(1)
        uv = torch.where((axis == 0)[:, None], point[:, [2, 1]],
                         torch.where((axis == 1)[:, None], point[:, [0, 2]], point[:, [0, 1]]))
    return uv / surface.tile + torch.tensor(surface.offset)


def render(scene: Scene, bank: "TextureBank") -> tuple[np.ndarray, np.ndarray]:
    """-> (RGB uint8 (H, W, 3), z-depth float32 (H, W) in metres, 0 where invalid)."""
    cam = scene.camera
    o, d = cam.rays()
    t, which, normal = intersect(cam, scene.surfaces, o, d)
    hit = which >= 0
    point = o + t.clamp(max=1e6)[:, None] * d
    albedo = torch.zeros_like(d)
    ray_length = d.norm(dim=1)
    for index, surface in enumerate(scene.surfaces):
        rows = (which == index).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        uv = _planar_uv(point[rows], normal[rows], surface)
        # Metres a pixel covers on the surface, in texels: the mip level that neither aliases nor blurs.
        slant = dot(normal[rows], d[rows]).abs() / ray_length[rows]
        metres = t[rows] * ray_length[rows] / cam.focal / slant.clamp(min=0.2)
        albedo[rows] = bank.sample(surface.texture, uv, metres / surface.tile * TEXTURE_SIZE)
    sun = torch.tensor(scene.sun)
    lit = (normal @ sun).clamp(min=0)
    shadow_origin = point + normal * 1e-3
    shadowed = torch.zeros_like(lit, dtype=torch.bool)
    rows = (hit & (lit > 0)).nonzero().squeeze(1)
    if rows.numel():
        origins, blocked = shadow_origin[rows], torch.zeros(rows.numel(), dtype=torch.bool)
        # Shadow rays are parallel: in a frame whose third axis is the sun, a shape's bounding sphere
        # can only shade the points within its radius on the first two axes, and below its top.
        across = torch.linalg.cross(sun, torch.tensor([0.0, 0.0, 1.0]) if abs(scene.sun[2]) < 0.9
                                    else torch.tensor([1.0, 0.0, 0.0]))
        frame = torch.stack([across / across.norm(), torch.linalg.cross(sun, across / across.norm()), sun], 1)
        projected = origins @ frame
        for surface in scene.surfaces[1:]:  # each shadow ray starts at its own point; the ground casts none
            bounds = _bounds(surface)
            if bounds is None:  # a wall: every point
                blocked |= torch.isfinite(_hit(surface, origins, sun.expand_as(origins))[0])
                continue
            centre = bounds[0] @ frame
            near = (((projected[:, 0] - centre[0]).abs() <= bounds[1])
                    & ((projected[:, 1] - centre[1]).abs() <= bounds[1])
                    & (projected[:, 2] <= centre[2] + bounds[1])).nonzero().squeeze(1)
            if near.numel():
                blocked[near] |= torch.isfinite(_hit(surface, origins[near], sun.expand(near.numel(), 3))[0])
        shadowed[rows] = blocked
    light = scene.ambient + scene.sun_strength * lit * (~shadowed).float()
    colour = albedo * light[:, None]
    fog = torch.exp(-scene.haze * t.clamp(max=1e6) * ray_length)[:, None]
    colour = colour * fog + torch.tensor(scene.haze_colour) * (1 - fog)
    horizon, zenith = torch.tensor(scene.sky[0]), torch.tensor(scene.sky[1])
    elevation = (d[:, 1] / ray_length).clamp(0, 1)[:, None].sqrt()
    sky = horizon * (1 - elevation) + zenith * elevation
    colour = torch.where(hit[:, None], colour, sky)
    image = (colour.clamp(0, 1).sqrt() * 255).round().to(torch.uint8)  # gamma 2: linear light to sRGB-like
    depth = torch.where(hit & (t > MIN_DEPTH) & (t < MAX_DEPTH), t, torch.zeros_like(t))
    shape = (cam.height_px, cam.width)
    return image.reshape(*shape, 3).numpy(), depth.reshape(shape).numpy().astype(np.float32)


# --- textures -------------------------------------------------------------------------------------

def _value_noise(rng: np.random.Generator, size: int, octaves: int = 5) -> np.ndarray:
    """Tileable fractal noise in [0, 1]: random lattices upsampled with wrap-around, summed."""
    total = np.zeros((size, size), np.float32)
    for octave in range(octaves):
        cells = 4 * 2 ** octave
        lattice = torch.from_numpy(rng.random((1, 1, cells, cells), dtype=np.float32))
        wrapped = torch.cat([lattice, lattice[:, :, :1]], 2)
        wrapped = torch.cat([wrapped, wrapped[:, :, :, :1]], 3)
        up = F.interpolate(wrapped, size=(size + size // cells, size + size // cells), mode="bicubic",
                           align_corners=True)[0, 0, :size, :size]
        total += up.numpy() * 0.55 ** octave
    total -= total.min()
    return total / max(total.max(), 1e-6)


def _palette(rng: np.random.Generator, count: int) -> np.ndarray:
    hues = (rng.random() + np.arange(count) * rng.uniform(0.05, 0.5)) % 1.0
    saturation, value = rng.uniform(0.15, 0.8, count), rng.uniform(0.25, 0.95, count)
    rgb = [np.array(Image.new("HSV", (1, 1), (int(h * 255), int(s * 255), int(v * 255))).convert("RGB"))[0, 0]
           for h, s, v in zip(hues, saturation, value)]
    return np.array(rgb, np.float32) / 255


def procedural_texture(family: str, seed: int, size: int = TEXTURE_SIZE) -> np.ndarray:
    """A tileable (size, size, 3) float texture in [0, 1] of one family, from its seed."""
    rng = np.random.default_rng([seed, sum(map(ord, family))])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = _value_noise(rng, size)
    colours = _palette(rng, 3)
    if family == "noise":
        weight = noise
    elif family == "checker":
        n = int(rng.integers(2, 9))
        weight = ((np.floor(x * n) + np.floor(y * n)) % 2) * 0.8 + noise * 0.2
    elif family == "stripes":
        n = int(rng.integers(3, 17))
        weight = (np.sin(2 * np.pi * (x * n + noise * rng.uniform(0, 1.5))) > 0) * 0.85 + noise * 0.15
    elif family == "bricks":
        rows = int(rng.choice([4, 8, 16]))
        row = np.floor(y * rows)
        shifted = x * rows / 2 + 0.5 * (row % 2)
        mortar = (np.abs(y * rows - np.round(y * rows)) < 0.06) | (np.abs(shifted - np.round(shifted)) < 0.04)
        weight = np.where(mortar, 1.0, noise * 0.4)
    elif family == "wood":
        n = int(rng.integers(3, 9))
        weight = (np.sin(2 * np.pi * (n * np.sqrt((x - 0.5) ** 2 * 0.05 + (y - 0.5) ** 2) * 4 + noise * 2)) + 1) / 2
    elif family == "tiles":
        n = int(rng.choice([2, 4, 8]))
        gap = (np.abs(x * n - np.round(x * n)) < 0.05) | (np.abs(y * n - np.round(y * n)) < 0.05)
        cell = rng.random((n, n)).astype(np.float32)[np.floor(y * n).astype(int) % n, np.floor(x * n).astype(int) % n]
        weight = np.where(gap, 1.0, cell * 0.6 + noise * 0.2)
    elif family == "dots":
        n = int(rng.integers(3, 10))
        fx, fy = x * n - np.floor(x * n) - 0.5, y * n - np.floor(y * n) - 0.5
        weight = (np.sqrt(fx ** 2 + fy ** 2) < rng.uniform(0.15, 0.4)) * 0.8 + noise * 0.2
    elif family == "marble":
        weight = (np.sin(2 * np.pi * (x * int(rng.integers(1, 4)) + noise * rng.uniform(2, 5))) + 1) / 2
    else:
        raise ValueError(f"unknown texture family {family!r}")
    weight = np.clip(weight, 0, 1)[..., None]
    texture = colours[0] * (1 - weight) + colours[1] * weight
    return np.clip(texture * (0.85 + 0.3 * noise[..., None]), 0, 1).astype(np.float32)


def photo_texture(path: Path, crop: int, size: int = TEXTURE_SIZE) -> np.ndarray:
    """A square piece of a photo (one of four crops), made tileable by mirroring."""
    image = Image.open(path).convert("RGB")
    side = min(image.size) * 3 // 4
    left = [0, image.width - side, 0, image.width - side][crop]
    top = [0, 0, image.height - side, image.height - side][crop]
    piece = image.crop((left, top, left + side, top + side)).resize((size // 2, size // 2), Image.BICUBIC)
    piece = np.asarray(piece, np.float32) / 255
    mirrored = np.concatenate([piece, piece[:, ::-1]], 1)
    return np.concatenate([mirrored, mirrored[::-1]], 0)


class TextureBank:
    """The textures one world may use, with their mip pyramids (linear-light RGB)."""

    def __init__(self, textures: list[np.ndarray]):
        self.levels = []
        for texture in textures:
            level = torch.from_numpy(np.ascontiguousarray(texture)).permute(2, 0, 1)[None] ** 2  # linear light
            pyramid = [level]
            for _ in range(MIP_LEVELS - 1):
                pyramid.append(F.avg_pool2d(pyramid[-1], 2))
            self.levels.append(pyramid)

    def __len__(self) -> int:
        return len(self.levels)

    def sample(self, texture: int, uv: torch.Tensor, texels_per_pixel: torch.Tensor) -> torch.Tensor:
        """Colours (N, 3) at `uv` (in tiles, any range: the texture repeats), bilinear in the mip
        level whose texel size is nearest the pixel's footprint."""
        level = texels_per_pixel.clamp(min=1).log2().round().clamp(max=MIP_LEVELS - 1).long()
        grid = (uv - uv.floor()) * 2 - 1
        colours = torch.empty(uv.shape[0], 3)
        for index in range(MIP_LEVELS):
            rows = (level == index).nonzero().squeeze(1)
            if rows.numel():
                colours[rows] = F.grid_sample(self.levels[texture][index], grid[rows][None, None], mode="bilinear",
                                              padding_mode="border", align_corners=False)[0, :, 0].T
        return colours


@lru_cache(maxsize=2)
def texture_bank(world: str) -> TextureBank:
    split = TEXTURE_SPLIT[world]
    textures = [photo_texture(SAMPLES / name, crop) for name in split["photos"] for crop in range(4)]
    families = split["families"]
    textures += [procedural_texture(families[i % len(families)], seed) for i, seed in enumerate(split["seeds"])]
    return TextureBank(textures)


# --- layouts --------------------------------------------------------------------------------------

def _seed_sequence(seed: int, world: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, WORLDS.index(world) + 17, index])


def sample_scene(seed: int, world: str, index: int, width: int, height: int) -> Scene:
    """The layout of sample `index`: camera, yard, objects, light; a function of its arguments only."""
    rng = np.random.default_rng(_seed_sequence(seed, world, index))
    textures = len(texture_bank(world))

    def surface(kind: str, params: tuple, tile_range=(0.4, 3.0)) -> Surface:
        return Surface(kind, tuple(float(p) for p in params), int(rng.integers(textures)),
                       float(np.exp(rng.uniform(*np.log(tile_range)))), tuple(rng.random(2).tolist()))

    camera = Camera(height=rng.uniform(0.4, 2.2), pitch=math.radians(rng.uniform(-5, 20)),
                    roll=math.radians(rng.uniform(-6, 6)), hfov=math.radians(rng.uniform(45, 80)),
                    width=width, height_px=height)
    surfaces = [surface("ground", ())]
    # The yard: a back wall ahead and two side walls, turned together about the vertical.
    yaw = rng.uniform(-0.5, 0.5)
    back, half_width = rng.uniform(6, 30), rng.uniform(3, 12)
    wall_top = rng.uniform(1.5, 8)
    c, s = math.cos(yaw), math.sin(yaw)
    ahead, across = np.array([s, 0, c]), np.array([c, 0, -s])
    surfaces.append(surface("wall", (*(ahead * back), *(-ahead), wall_top)))
    surfaces.append(surface("wall", (*(-across * half_width), *across, wall_top)))
    surfaces.append(surface("wall", (*(across * half_width), *(-across), wall_top)))
    # Objects standing on the ground, in front of the camera, inside the yard.
    for _ in range(int(rng.integers(3, 15))):
        depth_ahead = 1.5 + (back - 2.5) * rng.random() ** 1.5  # more of them near
        sideways = rng.uniform(-half_width + 0.5, half_width - 0.5)
        position = ahead * depth_ahead + across * sideways
        x, z = float(position[0]), float(position[2])
        size = rng.uniform(0.25, 1.6) * (1 + depth_ahead / 15)
        kind = rng.choice(["box", "sphere", "cylinder"], p=[0.45, 0.3, 0.25])
        if kind == "box":
            half = np.array([size, size * rng.uniform(0.4, 2.0), size * rng.uniform(0.5, 1.5)]) / 2
            surfaces.append(surface("box", (x, half[1], z, *half, rng.uniform(0, math.pi))))
        elif kind == "sphere":
            radius = size / 2
            surfaces.append(surface("sphere", (x, radius * rng.uniform(0.6, 1.0), z, radius)))
        else:
            surfaces.append(surface("cylinder", (x, 0.0, z, size / 2 * rng.uniform(0.3, 1.0),
                                                 size * rng.uniform(0.8, 3.0))))
    elevation, azimuth = math.radians(rng.uniform(20, 70)), rng.uniform(0, 2 * math.pi)
    sun = (math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth))
    horizon = tuple(float(v) for v in rng.uniform([0.6, 0.65, 0.7], [0.9, 0.9, 0.95]))
    zenith = tuple(float(v) for v in rng.uniform([0.15, 0.3, 0.55], [0.35, 0.5, 0.9]))
    return Scene(camera=camera, surfaces=tuple(surfaces), sun=sun, sun_strength=float(rng.uniform(0.6, 1.1)),
                 ambient=float(rng.uniform(0.15, 0.45)), haze=float(np.exp(rng.uniform(np.log(0.004),
                                                                                       np.log(0.04)))),
                 haze_colour=tuple(h ** 2 for h in horizon), sky=(tuple(h ** 2 for h in horizon),
                                                                  tuple(z ** 2 for z in zenith)))


def render_sample(seed: int, world: str, index: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    return render(sample_scene(seed, world, index, width, height), texture_bank(world))


# --- the command ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorldSpec:
    world: str
    seed: int
    width: int
    height: int
    min_depth: float = MIN_DEPTH
    max_depth: float = MAX_DEPTH
    format_version: int = FORMAT_VERSION


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()  # np.save to a path would add ".npy" to the temporary file's name
    np.save(buffer, array)
    return buffer.getvalue()


def write_sample(out: Path, spec: WorldSpec, index: int) -> None:
    image, depth = render_sample(spec.seed, spec.world, index, spec.width, spec.height)
    stem = f"{index:06d}"
    _write_atomically(out / "depth" / f"{stem}.npy", lambda p: p.write_bytes(_npy_bytes(depth)))
    mask = Image.fromarray(((depth > 0) * 255).astype(np.uint8))
    _write_atomically(out / "mask" / f"{stem}.png", lambda p: mask.save(p, format="PNG", compress_level=1))
    # The image last: a sample counts as written once its image is there.
    _write_atomically(out / "images" / f"{stem}.png",
                      lambda p: Image.fromarray(image).save(p, format="PNG", compress_level=1))


def _worker(args: tuple[Path, WorldSpec, list[int]]) -> int:
    out, spec, indices = args
    for index in indices:
        write_sample(out, spec, index)
    return len(indices)


class WorldError(Exception):
    """A mistake in the command's arguments or folder: one line for the user."""


def prepare_folder(out: Path, spec: WorldSpec) -> None:
    """Create `out`, or continue one this command wrote with the same settings; refuse anything else."""
    meta = out / "world.json"
    if out.exists() and any(out.iterdir()):
        if not meta.is_file():
            raise WorldError(f"{out} holds other files and no world.json: choose an empty or new folder")
        written, wanted = json.loads(meta.read_text()), asdict(spec)
        if written != wanted:
            changed = sorted(k for k in written.keys() | wanted.keys() if written.get(k) != wanted.get(k))
            raise WorldError(f"{out} holds a world written with other settings ({', '.join(changed)}): choose "
                             f"another --out, or the same settings to add samples")
    for name in ("images", "depth", "mask"):
        (out / name).mkdir(parents=True, exist_ok=True)
    write_json_atomically(meta, asdict(spec), indent=2)


def generate(out: Path, spec: WorldSpec, count: int, workers: int = 1) -> int:
    """Write samples 0..count-1 that are not there yet -> how many were written."""
    prepare_folder(out, spec)
    todo = [i for i in range(count) if not (out / "images" / f"{i:06d}.png").is_file()]
    texture_bank(spec.world)  # built once, before the workers fork
    if workers <= 1 or len(todo) < 2:
        return _worker((out, spec, todo))
    import multiprocessing

    chunks = [(out, spec, todo[w::workers]) for w in range(workers)]
    # One thread each: the workers fill the cores (the calling process keeps its own setting).
    with multiprocessing.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return sum(pool.map(_worker, chunks))


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 256x256") from None
    if min(size) < 8:
        raise argparse.ArgumentTypeError(f"--size {text!r}: at least 8 pixels a side")
    return size


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write (new, or one written before)")
    parser.add_argument("--count", required=True, type=int, help="samples 0..COUNT-1")
    parser.add_argument("--size", default=(256, 256), type=_size, help="WIDTHxHEIGHT (default 256x256)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--world", default="train", choices=WORLDS)
    parser.add_argument("--workers", default=os.cpu_count() or 1, type=int, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.workers < 1:
        parser.error("--count and --workers must be at least 1")
    spec = WorldSpec(args.world, args.seed, *args.size)
    try:
        written = generate(args.out, spec, args.count, args.workers)
    except (WorldError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {written} samples of the {args.world} world to {args.out} ({args.count - written} were there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
