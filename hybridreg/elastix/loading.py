"""Loading itk's elastix wrapping: once per process, with ITK's Pool threader.

Importing :mod:`hybridreg.elastix` imports neither itk nor elastix. The first call that
needs them runs :func:`load_itk`: it selects ITK's ``Pool`` threader (the default TBB
threader is slow and crashes when a thread count is set) *before* any filter runs, and
touches the elastix wrapping, which costs over ten seconds, once per process.
"""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

_ITK = None
_CORE = None
_LOAD_LOCK = threading.Lock()


def load_itk_core():
    """Import itk with the Pool threader, without the elastix wrapping (for what needs ITK
    only, e.g. writing a transform file: loading elastix costs over ten seconds)."""
    global _CORE
    if _ITK is not None:
        return _ITK
    if _CORE is None:
        os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")
        import itk

        base = itk.MultiThreaderBase
        pool = itk.MultiThreaderBaseEnums.Threader_Pool
        if base.GetGlobalDefaultThreader() != pool:
            base.SetGlobalDefaultThreader(pool)
        _CORE = itk
    return _CORE


def load_itk():
    """Import itk with the Pool threader and load the elastix wrapping, once per process.

    Safe to call often and from several threads: only the first call does the work. If itk
    was already imported with another default threader, the Pool threader is selected
    anyway, before any elastix filter is created here.

    Returns
    -------
    module
        The ``itk`` module, with ``itk.ElastixRegistrationMethod`` loaded.
    """
    global _ITK
    if _ITK is not None:
        return _ITK
    with _LOAD_LOCK:
        if _ITK is None:
            t0 = time.perf_counter()
            os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")
            import itk

            base = itk.MultiThreaderBase
            pool = itk.MultiThreaderBaseEnums.Threader_Pool
            if base.GetGlobalDefaultThreader() != pool:
                log.info("selecting ITK's Pool threader (was %s)",
                         base.ThreaderTypeToString(base.GetGlobalDefaultThreader()))
                base.SetGlobalDefaultThreader(pool)
            # Touch the lazily loaded elastix wrapping once.
            itk.ElastixRegistrationMethod  # noqa: B018
            itk.TransformixFilter  # noqa: B018
            itk.ParameterObject  # noqa: B018
            _ITK = itk
            log.info("loaded itk %s with elastix in %.1f s", itk.Version.GetITKVersion(),
                     time.perf_counter() - t0)
    return _ITK
