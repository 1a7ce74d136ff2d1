"""The one place that builds a SparkSession from config.

Local mode (`local[*]`) is the default; the same jobs run on a standalone, YARN
or Kubernetes master by setting `spark.master` (see conf/cluster.yaml).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

from siren_batch import console
from siren_batch.backends.device import gpu_ordinal, on_gpu
from siren_batch.config import ConfigError, SparkConfig

logger = logging.getLogger(__name__)

# The driver JVM's log4j configuration: WARN and above, without the harmless warnings
# every laptop run prints (no native BLAS, no native Hadoop, loopback hostname, ...).
LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")


def check_java() -> None:
    """Fail with one clear line when no Java runtime is available (Spark needs it)."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "bin", "java")):
        return
    if shutil.which("java") is None:
        raise ConfigError("Java not found: install Java 17 (e.g. apt-get install openjdk-17-jre-headless) "
                          "or set JAVA_HOME")


def get_spark(cfg: SparkConfig):
    """Return the active SparkSession or build one from `cfg`."""
    check_java()
    from pyspark.sql import SparkSession

    # Workers must run the driver's interpreter, or they import another Python's
    # packages (a classic local-mode failure). On a cluster the conf may override.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if cfg.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    settings = {
        "spark.master": cfg.master,
        "spark.app.name": cfg.app_name,
        "spark.driver.memory": cfg.driver_memory,
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch_size),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.executorEnv.PYSPARK_PYTHON": os.environ["PYSPARK_PYTHON"],
        **cfg.extra,
        "spark.driver.extraJavaOptions": driver_java_options(cfg),
    }
    builder = SparkSession.builder
    for key, value in settings.items():
        builder = builder.config(key, value)
    with _jvm_stderr_to(console.jvm_stderr()):
        _gateway_in_its_own_session(settings)
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    logger.info("spark session: master=%s version=%s", cfg.master, spark.version)
    return spark


def _gateway_in_its_own_session(settings: dict) -> None:
    """Start the driver JVM in a session of its own. PySpark would start it in ours, so a
    SIGTERM to our process group (a scheduler's stop, systemd, `timeout`) would shut the
    JVM down under the Python driver, which could then neither cancel its job nor release
    the warehouse lock (siren_batch.stopping). The JVM still ends with this process: it
    exits when its stdin, a pipe from here, closes. A no-op when a gateway is up already
    (a session exists, or spark-submit started this process and holds the JVM), and
    under Spark Connect."""
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    connect = "SPARK_REMOTE" in os.environ or "spark.remote" in settings   # Spark Connect starts no gateway
    if SparkContext._gateway is not None or "PYSPARK_GATEWAY_PORT" in os.environ or connect:
        return
    conf = SparkConf(loadDefaults=False).setAll(list(settings.items()))
    SparkContext._ensure_initialized(gateway=launch_gateway(conf, popen_kwargs={"start_new_session": True}))


def task_cpus(spark) -> int:
    """spark.task.cpus: the cores Spark reserves for each task. A task's torch runs this many
    threads, so the tasks running side by side on an executor share its cores."""
    return int(spark.conf.get("spark.task.cpus", "1"))


def task_threads(configured: int, spark) -> int:
    """Torch threads for one task: `configured` (a stage's torch_threads), or spark.task.cpus
    when it is 0."""
    return configured or task_cpus(spark)


def task_gpu() -> int | None:
    """Torch's number for the GPU Spark gave the running task (spark.task.resource.gpu.amount,
    conf/cluster.yaml); None on the driver, in local mode and without GPU scheduling. On a
    worker with several GPUs this is what keeps each executor's model on its own GPU."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    return gpu_ordinal(gpus.addresses) if gpus is not None and gpus.addresses else None


def task_config(cfg):
    """`config()` -> `cfg` (a stage config with a `device`) on the GPU Spark gave the running
    task (backends.device.on_gpu), for a loader closure: worked out once per GPU, not per batch."""
    configs = {}

    def config():
        gpu = task_gpu()
        if gpu not in configs:
            configs[gpu] = on_gpu(cfg, gpu)
        return configs[gpu]

    return config


def driver_java_options(cfg: SparkConfig) -> str:
    """spark.driver.extraJavaOptions with our log4j2.properties, merged into the user's
    own options (spark.extra) unless those already name a log4j configuration."""
    own = cfg.extra.get("spark.driver.extraJavaOptions", "").strip()
    if "log4j2.configurationFile" in own or "log4j.configurationFile" in own:
        return own
    return f"{own} -Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()}".strip()


@contextlib.contextmanager
def _jvm_stderr_to(path: Path | None):
    """While the driver JVM starts, point file descriptor 2 at `path`, so the JVM
    inherits it. Its native-library lines (netlib's "JNI_OnLoad: dlopen(libblas.so.3)
    failed"), the JVM's "Using incubator modules" and, in local mode, the Python workers'
    stderr are printed past log4j and can only be caught there. A no-op when `path` is
    None or a SparkContext is already running (its JVM has its stderr already)."""
    from pyspark import SparkContext

    if path is None or SparkContext._active_spark_context is not None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)
