"""Training curves, validation metrics, parameter histograms and hyperparameters for
TensorBoard, written with tensorboardX.

The hyperparameters go into the run's own event file as the HParams plugin's three summaries:
the experiment (the hyperparameters' names and types, and which of the run's scalars are its
metrics), the session start (the values) and the session end (success or failure). The HParams
tab then shows one row per run, whose metric columns are the last values of the run's own
curves. TensorBoard keeps the first of these summaries it reads in a run, so a fit that writes
them first removes those of earlier fits from the run's older event files: a resumed fit's row
shows the resumed fit's settings.
"""

from __future__ import annotations

import numbers
import os
import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from google.protobuf.message import DecodeError
from tensorboardX import SummaryWriter
from tensorboardX.proto import api_pb2, plugin_hparams_pb2
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

from aimz_trainer.callbacks.logger import MetricLogger, run_hparams, writable_directory
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["TensorBoardLogger"]

HParam = bool | str | float | int


class TensorBoardLogger(MetricLogger):
    """Writes the fit's scalars (see :mod:`aimz_trainer.callbacks.logger`) as TensorBoard events.

    Besides the scalars: at each epoch end a histogram of every variational parameter
    (``params/<site>_auto_loc``, ``params/<site>_auto_scale`` for an ``AutoNormal`` guide), and
    the run's hyperparameters for TensorBoard's HParams tab: the trainer's settings, the batch
    size, the device count and ``hparams``, written into the run itself when the fit starts (a
    fit that crashes has its row too; a resumed fit's replace the earlier fit's), with the
    fit's loss and validation curves as the row's metrics, and at fit end whether the fit
    succeeded or raised. Runs compared in one TensorBoard should be given the same ``hparams``
    names: TensorBoard takes the columns of the HParams tab from one of the runs.

    Args:
        log_dir: the run's directory (created; must be writable). Point TensorBoard at it or
            at its parent: ``tensorboard --logdir runs``.
        hparams: extra hyperparameters to record (e.g. the learning rate, the model's width).
        log_histograms: write the parameter histograms.

    Example:
        >>> import tempfile
        >>> logger = TensorBoardLogger(tempfile.mkdtemp(), hparams={"learning_rate": 1e-3})
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        hparams: Mapping[str, HParam] | None = None,
        log_histograms: bool = True,
    ) -> None:
        super().__init__()
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ConfigurationError(f"hparams must map names to values or be None; got {type(hparams).__name__}.")
        for name, value in (hparams or {}).items():
            # TensorBoard records str, bool and number values only (others silently as "unset"),
            # under str names.
            if not isinstance(name, str) or not isinstance(value, str | numbers.Real):
                raise ConfigurationError(
                    f"hparams[{name!r}] must be a str, bool or number under a str name; got {value!r}."
                )
        if not isinstance(log_histograms, bool):
            raise ConfigurationError(f"log_histograms must be True or False; got {log_histograms!r}.")
        self.log_dir = writable_directory(log_dir, "log_dir") if self.is_writer else None
        # NumPy scalars as Python ones, as the HParams summaries record them.
        self.hparams = {
            name: value.item() if isinstance(value, np.generic) else value for name, value in (hparams or {}).items()
        }
        self.log_histograms = log_histograms
        self._writer: SummaryWriter | None = None
        self._status: int | None = None  # the session's end status, once the fit has ended
        self._step = 0

    def open(self, fit: FitContext, resume_step: int | None) -> None:
        assert self.log_dir is not None
        evaluation = resume_step is None  # Trainer.validate/test: scalars join the run, its row stays
        if not evaluation:
            # TensorBoard shows a run's first hparams: an earlier fit's go, before this fit's file exists.
            _drop_hparams(self.log_dir)
        # purge_step hides events at steps >= resume_step that a previous run left behind, for
        # readers that load the files in name order. tensorboardX names files by the second and
        # truncates an existing one: the nanosecond suffix keeps a writer opened in the same
        # second off the earlier file and sorts it after it.
        suffix = f".{time.time_ns():020d}.{uuid.uuid4().hex[:6]}"
        self._writer = SummaryWriter(str(self.log_dir), purge_step=resume_step or None, filename_suffix=suffix)
        self._status, self._step = None, resume_step
        if evaluation:
            return
        experiment, start = _hparams_summaries(run_hparams(fit) | self.hparams, _metric_names(fit))
        for summary in (experiment, start):
            self._writer.file_writer.add_summary(summary, global_step=resume_step)
        self._writer.flush()  # on disk before the first step: a crashed fit still has its row

    def write(self, step: int, epoch: int, scalars: Mapping[str, float]) -> None:
        assert self._writer is not None
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        if self._writer is not None and self.log_histograms:
            for name, value in _float_leaves(jax.device_get(fit.current_params())):
                _add_histogram(self._writer, f"params/{name}", value, progress.step - 1)

    def on_fit_end(self, fit: FitContext, progress: FitProgress) -> None:
        self._status, self._step = api_pb2.Status.Value("STATUS_SUCCESS"), max(progress.step - 1, 0)

    def on_exception(self, fit: FitContext, progress: FitProgress, exception: BaseException) -> None:
        # After on_fit_end too: the fit raised after all (drawing the posterior, a later hook).
        self._status, self._step = api_pb2.Status.Value("STATUS_FAILURE"), max(progress.step - 1, 0)

    def close(self) -> None:
        assert self._writer is not None
        if self._status is not None:
            self._writer.file_writer.add_summary(_session_end(self._status), global_step=self._step)
        self._writer.close()
        self._writer = None


def _float_leaves(params: Any) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` for every floating-point leaf: ``w_auto_loc``, ``a/b`` when nested."""
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf)
        if np.issubdtype(value.dtype, np.floating):
            leaves.append(("/".join(str(getattr(key, "key", key)) for key in path), value))
    return leaves


def _add_histogram(writer: SummaryWriter, tag: str, values: np.ndarray, step: int, bins: int = 30) -> None:
    """A histogram of ``bins`` equal buckets: tensorboardX's default of ~1,500 exponential
    buckets costs several times more host time, which the devices feel on a small machine."""
    values = values.astype(np.float64, copy=False).ravel()
    counts, edges = np.histogram(values, bins=bins)
    writer.add_histogram_raw(
        tag,
        min=float(values.min()),
        max=float(values.max()),
        num=values.size,
        sum=float(values.sum()),
        sum_squares=float(values @ values),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def _metric_names(fit: FitContext) -> list[str]:
    """The fit's curves that are the HParams tab's metrics: its losses and validation metrics."""
    names = ["train_loss", "train_loss_per_row", "train_loss_epoch", "train_loss_per_row_epoch"]
    names += list(fit.settings.step_metrics)
    return names + (["val_loss", "val_lpd"] if fit.has_validation else [])


# -- the HParams plugin's summaries (tensorboard/plugins/hparams/metadata.py names the tags) ------

HPARAMS_PLUGIN = "hparams"
HPARAMS_TAGS = ("_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info")


def _plugin_summary(tag: str, data: plugin_hparams_pb2.HParamsPluginData) -> Summary:
    plugin_data = SummaryMetadata.PluginData(plugin_name=HPARAMS_PLUGIN, content=data.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin_data))])


def _hparams_summaries(hparams: Mapping[str, HParam], metrics: list[str]) -> tuple[Summary, Summary]:
    """The experiment (names and types of ``hparams``, ``metrics`` as scalar tags of the run
    itself) and the session start (the values) for a run."""
    start = plugin_hparams_pb2.SessionStartInfo(start_time_secs=time.time())
    infos = []
    for name, value in hparams.items():
        if isinstance(value, str):
            start.hparams[name].string_value, kind = value, "DATA_TYPE_STRING"
        elif isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        else:
            start.hparams[name].number_value, kind = float(value), "DATA_TYPE_FLOAT64"
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind)))
    # An empty group: the metric is the scalar of that tag in the session's own run.
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics]
    )
    return (
        _plugin_summary(HPARAMS_TAGS[0], plugin_hparams_pb2.HParamsPluginData(experiment=experiment)),
        _plugin_summary(HPARAMS_TAGS[1], plugin_hparams_pb2.HParamsPluginData(session_start_info=start)),
    )


def _session_end(status: int) -> Summary:
    end = plugin_hparams_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return _plugin_summary(HPARAMS_TAGS[2], plugin_hparams_pb2.HParamsPluginData(session_end_info=end))


def _drop_hparams(log_dir: Path) -> None:
    """Remove the HParams summaries from the event files in ``log_dir``.

    TensorBoard keeps the first summary of a tag it reads in a run and ignores later ones, so
    a resumed fit's hyperparameters would not show while an earlier fit's are there. Each file
    holding them is rewritten without them (to a name TensorBoard does not read, then renamed
    over the file); every other record is copied byte for byte, a truncated tail included.
    """
    for path in sorted(log_dir.iterdir()):
        if "tfevents" not in path.name or not path.is_file():
            continue
        data = path.read_bytes()
        kept, dropped = bytearray(), False
        for record, payload in _records(data):
            if payload is not None and b"_hparams_/" in payload and _only_hparams(payload):
                dropped = True
            else:
                kept += record
        if dropped:
            staging = log_dir / f".aimz-rewrite-{uuid.uuid4().hex}"
            staging.write_bytes(bytes(kept))
            os.replace(staging, path)


def _records(data: bytes) -> Iterator[tuple[bytes, bytes | None]]:
    """``(framed record, its payload)`` for each record of a TFRecord file's bytes (a length,
    its checksum, the payload, its checksum); a truncated tail comes last with payload ``None``."""
    offset = 0
    while offset < len(data):
        end = offset + 12 + struct.unpack_from("<Q", data, offset)[0] + 4 if len(data) - offset >= 8 else None
        if end is None or end > len(data):
            yield data[offset:], None
            return
        yield data[offset:end], data[offset + 12 : end - 4]
        offset = end


def _only_hparams(payload: bytes) -> bool:
    try:
        event = Event.FromString(payload)
    except DecodeError:  # not an event we could have written: keep it
        return False
    values = event.summary.value
    return bool(values) and all(value.tag in HPARAMS_TAGS for value in values)
