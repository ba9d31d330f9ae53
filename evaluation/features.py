"""Feature networks behind one interface: uint8 NHWC images -> {'pool', 'spatial', 'softmax'} float32 arrays.

Two networks (spec evaluator.md §4):

* ``FashionFeatures``: the embedded Fashion-MNIST classifier (evaluation/fashion_classifier.py), CPU-friendly, no
  download. Its pool / spatial / logits taps stand in for Inception's. Named ``fashion-classifier sha256:<ckpt>``,
  the string evaluation/fashion_reference.py stores as ``feature_network`` in the reference batch, so stored
  statistics are only used with the classifier that made them.
* ``InceptionFeatures``: the OpenAI evaluator's exact network, the 2015 Inception-v3 GraphDef
  ``classify_image_graph_def.pb``, run by TensorFlow (optional: ``pip install tensorflow-cpu``). No port: the
  graph's own TF1 bilinear resize to 299² and (x − 128)/128 run as published, which a torch port does not match.

``compute_activations`` streams a batch file through a network with a tqdm bar; ``check_compatible`` refuses a
batch whose image size or stored statistics do not fit the network, before any compute.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from evaluation.npz_io import ImageBatch
from ldm.fileio import file_sha256
from ldm.util import UserFacingError

INCEPTION_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                 "classify_image_graph_def.pb")
INCEPTION_GRAPH = "classify_image_graph_def.pb"   # default path: the working directory, as the OpenAI script
INSTALL_TF = "pip install tensorflow-cpu (or pip install -e '.[inception]')"
FASHION_PREFIX = "fashion-classifier"
FEATURE_KEYS = ("pool", "spatial", "softmax")
NETWORKS = ("fashion", "inception")


class FeatureNetworkError(UserFacingError):
    """A feature network that cannot be loaded, or a batch it cannot take."""


class FeatureNetwork(Protocol):
    name: str                 # recorded in the JSON result; compared with a batch's stored feature_network
    pool_dim: int             # D of mu / sigma
    spatial_dim: int          # D of mu_s / sigma_s
    default_batch_size: int

    def check_image_size(self, height: int, width: int) -> None:
        """Raise FeatureNetworkError for an image size the network does not take."""

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3] on 0..255 -> pool [B, pool_dim], spatial [B, spatial_dim], softmax [B, K] (float32)."""




# ---------------------------------------------------------------------------------------------------------------------
# The embedded Fashion-MNIST classifier


class FashionFeatures:
    """The committed Fashion classifier's taps: pool (global-average-pooled last stage), spatial (first channels of
    the 8×8 map, NHWC-flattened) and the softmax of its logits. Takes 28×28 or 32×32 RGB (gray repeated) uint8."""

    default_batch_size = 500

    def __init__(self, directory: str | os.PathLike | None = None, device="cpu"):
        import torch

        from evaluation.fashion_classifier import DEFAULT_DIR, compute_features, load_fashion_classifier
        directory = Path(directory) if directory is not None else DEFAULT_DIR
        ckpt = directory / "model.ckpt"
        if not ckpt.is_file() or not (directory / "config.yaml").is_file():
            raise FeatureNetworkError(f"Fashion classifier not found in {directory} (model.ckpt + config.yaml); "
                                      f"it is committed in models/eval/fashion-classifier, or train it with "
                                      f"python main.py --base configs/eval/fashion-classifier.yaml")
        self.model = load_fashion_classifier(directory)
        self.device = torch.device(device)
        self._compute = compute_features
        # the same string evaluation/fashion_reference.py stores in the reference batch
        self.name = f"{FASHION_PREFIX} sha256:{file_sha256(ckpt)}"
        probe = self(np.zeros((1, 32, 32, 3), np.uint8))
        self.pool_dim, self.spatial_dim = probe["pool"].shape[1], probe["spatial"].shape[1]

    @staticmethod
    def check_image_size(height: int, width: int) -> None:
        if (height, width) not in ((28, 28), (32, 32)):
            raise FeatureNetworkError(f"the Fashion classifier takes 28×28 or 32×32 images, got {height}×{width}; "
                                      f"use --features inception for other data")

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        f = self._compute(self.model, images, batch_size=max(len(images), 1), device=self.device)
        return {k: f[k] for k in FEATURE_KEYS}


# ---------------------------------------------------------------------------------------------------------------------
# The OpenAI Inception graph (TensorFlow)


def import_tensorflow():
    """TensorFlow, or a one-line error that says how to install it (it is an optional dependency)."""
    try:
        import tensorflow as tf
    except ImportError:
        raise FeatureNetworkError(f"--features inception needs TensorFlow, which is not installed: {INSTALL_TF}; "
                                  f"or use --features fashion for the embedded Fashion-MNIST default") from None
    return tf


class InceptionFeatures:
    """The OpenAI evaluator's Inception-v3 features (spec §4), computed by the graph itself with TensorFlow.

    * images: a float32 [B, H, W, 3] batch on 0..255 fed into the graph tensor ``ExpandDims:0``, which skips the
      graph's JPEG decoder; the graph then resizes to 299×299 (TF1 ResizeBilinear) and maps to (x − 128)/128.
    * pool: ``pool_3:0`` [B, 1, 1, 2048] -> [B, 2048] (FID, precision/recall, IS).
    * spatial: ``mixed_6/conv:0`` [B, 17, 17, 192], first 7 channels, flattened in NHWC order -> [B, 2023] (sFID;
      the order matters against the stored mu_s/sigma_s of the OpenAI reference batches).
    * softmax: softmax(pool @ W) in float32 over the 1008 classes, W [2048, 1008] being the second input of the
      graph's ``softmax/logits/MatMul``; no bias, as the reference (torch-fidelity's "logits_unbiased").

    Left out of the reference on purpose: the warm-up batch (no effect on results) and ``_update_shapes`` (rewrites
    private static-shape fields; the spec measured it to be a no-op under TF 2.15/2.21, and the tensors used here
    are reshaped from their runtime shapes).
    """

    default_batch_size = 64          # images per sess.run in the reference (no effect on results)
    softmax_batch_size = 512         # rows per softmax sess.run in the reference (row-wise: no effect)
    pool_dim, spatial_dim, spatial_channels = 2048, 17 * 17 * 7, 7

    def __init__(self, graph_path: str | os.PathLike = INCEPTION_GRAPH, device: str = "auto"):
        """device: "cpu" hides the GPUs from TensorFlow; anything else lets TF place the ops itself (soft
        placement, as the reference)."""
        path = Path(graph_path)
        if not path.is_file():
            raise FeatureNetworkError(f"Inception graph {path} not found: download {INCEPTION_URL} (about 95 MB) "
                                      f"and pass --inception_graph PATH")
        tf = import_tensorflow()
        if str(device).startswith("cpu"):
            try:  # must happen before TF touches a GPU; harmless when there is none
                tf.config.set_visible_devices([], "GPU")
            except (RuntimeError, ValueError):
                pass
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except Exception as e:  # protobuf's DecodeError; its module path differs between protobuf versions
            raise FeatureNetworkError(f"{path} is not a TensorFlow GraphDef ({type(e).__name__}); download the "
                                      f"graph again from {INCEPTION_URL}") from None
        self.name = f"openai-inception-2015-12-05 {path.name} sha256:{file_sha256(path)}"
        self._tf = tf
        self._graph = tf.Graph()
        try:
            self._build(graph_def)
        except (ValueError, KeyError, IndexError) as e:
            raise FeatureNetworkError(f"{path} is not the OpenAI Inception graph (expected tensors ExpandDims:0, "
                                      f"pool_3:0, mixed_6/conv:0, op softmax/logits/MatMul: "
                                      f"{' '.join(str(e).split())[:200]}); download {INCEPTION_URL}") from None
        config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True   # as the reference: do not reserve the whole GPU
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)

    def _build(self, graph_def) -> None:
        tf = self._tf
        with self._graph.as_default():
            self._images = tf.compat.v1.placeholder(tf.float32, shape=[None, None, None, 3], name="images")
            pool, spatial = tf.import_graph_def(graph_def, input_map={"ExpandDims:0": self._images},
                                                return_elements=["pool_3:0", "mixed_6/conv:0"], name="features")
            self._pool = pool
            self._spatial = spatial[..., :self.spatial_channels]
            # The reference imports the graph a second time only to take the logits weight matrix; so do we (the
            # second copy's other ops are never run).
            (matmul,) = tf.import_graph_def(graph_def, return_elements=["softmax/logits/MatMul"], name="softmax")
            weights = matmul.inputs[1]                                                # [2048, 1008]
            self._pool_in = tf.compat.v1.placeholder(tf.float32, shape=[None, self.pool_dim], name="pool_in")
            self._softmax = tf.nn.softmax(tf.matmul(self._pool_in, weights))

    @staticmethod
    def check_image_size(height: int, width: int) -> None:
        """Any size: the graph resizes to 299×299 (without antialiasing, so large inputs alias as in the
        published numbers)."""

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(images).astype(np.float32)   # 0..255, no rescaling: the graph normalises
        pool, spatial = self._session.run([self._pool, self._spatial], {self._images: x})
        pool = pool.reshape(len(x), -1)
        spatial = spatial.reshape(len(x), -1)        # NHWC order: index (h·17 + w)·7 + c
        rows = self.softmax_batch_size
        softmax = np.concatenate([self._session.run(self._softmax, {self._pool_in: pool[i:i + rows]})
                                  for i in range(0, len(pool), rows)], axis=0)
        return {"pool": pool, "spatial": spatial, "softmax": softmax}


# ---------------------------------------------------------------------------------------------------------------------
# Choosing and running a network


def choose_network(requested: str, ref: ImageBatch) -> str:
    """``auto``: the Fashion classifier when the reference batch says its statistics came from it (the
    ``feature_network`` entry that evaluation/fashion_reference.py writes), else Inception as the OpenAI
    evaluator. Image size alone is not used: 32×32 could be CIFAR or downsampled ImageNet as well."""
    if requested in NETWORKS:
        return requested
    if requested != "auto":
        raise FeatureNetworkError(f"unknown feature network '{requested}'; choose auto, {', '.join(NETWORKS)}")
    declared = ref.feature_network or ""
    return "fashion" if declared.startswith(FASHION_PREFIX) else "inception"


NETWORK_CLASSES = {"fashion": FashionFeatures, "inception": InceptionFeatures}


def _check_size(rule, batch: ImageBatch) -> None:
    try:
        rule(*batch.image_size)
    except FeatureNetworkError as e:
        raise FeatureNetworkError(f"{batch.describe()}: {e}") from None


def check_image_size(kind: str, batch: ImageBatch) -> None:
    """The network's image-size rule, checked before the network is loaded."""
    _check_size(NETWORK_CLASSES[kind].check_image_size, batch)


def load_network(kind: str, *, inception_graph: str | os.PathLike = INCEPTION_GRAPH, device="cpu") -> FeatureNetwork:
    """device: a torch device for the Fashion classifier; for Inception "cpu" or anything else (TF places)."""
    if kind == "fashion":
        return FashionFeatures(device=device)
    if kind == "inception":
        return InceptionFeatures(inception_graph, device=device)
    raise FeatureNetworkError(f"unknown feature network '{kind}'; choose one of {', '.join(NETWORKS)}")


def check_compatible(batch: ImageBatch, network: FeatureNetwork) -> None:
    """Refuse before any compute: an image size the network does not take, or stored statistics made by another
    network (a different feature_network string, or dimensions that do not match)."""
    _check_size(network.check_image_size, batch)
    if batch.stats is None:
        return
    if batch.feature_network is not None and batch.feature_network != network.name:
        raise FeatureNetworkError(f"{batch.describe()} stores statistics of '{batch.feature_network}', but the "
                                  f"features come from '{network.name}'; rebuild the reference batch "
                                  f"(python -m evaluation.fashion_reference) or pick the matching --features")
    d_pool, d_spatial = len(batch.stats["mu"]), len(batch.stats["mu_s"])
    if (d_pool, d_spatial) != (network.pool_dim, network.spatial_dim):
        raise FeatureNetworkError(f"{batch.describe()} stores {d_pool}-d pool / {d_spatial}-d spatial statistics, "
                                  f"but the network gives {network.pool_dim} / {network.spatial_dim}; pick the "
                                  f"matching --features")


def compute_activations(network: FeatureNetwork, batch: ImageBatch, batch_size: int | None = None,
                        desc: str | None = None) -> dict[str, np.ndarray]:
    """All of arr_0 through the network, in file order, with a progress bar on stderr."""
    batch_size = batch_size or network.default_batch_size
    parts: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
    with tqdm(total=batch.n, desc=desc or f"{batch.role} features", unit="img", dynamic_ncols=True) as bar:
        for images in batch.iter_images(batch_size):
            feats = network(images)
            for k in FEATURE_KEYS:
                parts[k].append(np.asarray(feats[k], dtype=np.float32))
            bar.update(len(images))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
