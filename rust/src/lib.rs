//! storescp core: the DICOM upper layer and streaming store of a Storage SCP, and
//! (with the `python` feature) its PyO3 boundary, `storescp._core`.
//!
//! Only this file imports pyo3. Python hands down every policy once, as a
//! `CoreConfig`; workers never call Python; Python drains events in batches and
//! acknowledges index commits (see `events.rs`).

pub mod association;
pub mod birthplace;
pub mod dimse;
pub mod direct_write;
pub mod events;
pub mod group_sync;
pub mod meta;
pub mod naming;
pub mod pdu;
pub mod registry;
pub mod server;
pub mod service;
pub mod sniff;
pub mod spare_folders;
pub mod store;
pub mod transport;

#[cfg(feature = "python")]
mod python {
    use std::collections::HashSet;
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::time::Duration;

    use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyDict};

    use crate::association::{AcceptPolicy, AllowedCaller};
    use crate::events;
    use crate::meta::{self, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
    use crate::naming::{self, Naming};
    use crate::pdu;
    use crate::server::{self, Settings};
    use crate::sniff::{Encoding, SniffError, Sniffer};
    use crate::store::{self, DuplicatePolicy, StoreConfig};
    use crate::transport;

    /// Receive maximum allowed for `max_pdu` (PS3.8 D.1 allows up to 2^32-1; we bound
    /// it so one association's buffer stays small).
    const MAX_PDU_CEILING: u32 = 16 * 1024 * 1024;

    /// Everything the core needs, decided once by Python at start (see `_core.pyi`).
    #[pyclass(frozen, module = "storescp._core")]
    struct CoreConfig {
        settings: Settings,
        store: StoreConfig,
    }

    #[pymethods]
    impl CoreConfig {
        #[new]
        #[pyo3(signature = (
            *, ae_title, storage_dir, accepted_sop_classes, transfer_syntaxes,
            bind = "0.0.0.0".to_string(), port = 11112, naming = "hierarchical".to_string(),
            duplicate = "reject".to_string(), max_assoc = 10, idle_timeout = 300.0,
            artim_timeout = 30.0, max_pdu = 262_144, fsync = true, called_ae_check = false,
            allowed_calling = None, journal = false, report_stored = true
        ))]
        #[allow(clippy::too_many_arguments)]
        fn new(
            ae_title: String,
            storage_dir: PathBuf,
            accepted_sop_classes: Vec<String>,
            transfer_syntaxes: Vec<String>,
            bind: String,
            port: u16,
            naming: String,
            duplicate: String,
            max_assoc: usize,
            idle_timeout: f64,
            artim_timeout: f64,
            max_pdu: u32,
            fsync: bool,
            called_ae_check: bool,
            allowed_calling: Option<Vec<String>>,
            journal: bool,
            report_stored: bool,
        ) -> PyResult<CoreConfig> {
            let naming = Naming::parse(&naming)
                .ok_or_else(|| PyValueError::new_err(format!("unknown naming '{naming}'")))?;
            let duplicate = DuplicatePolicy::parse(&duplicate).ok_or_else(|| {
                PyValueError::new_err(format!("unknown duplicate policy '{duplicate}'"))
            })?;
            if max_assoc == 0 {
                return Err(PyValueError::new_err("max_assoc must be at least 1"));
            }
            if !(4096..=MAX_PDU_CEILING).contains(&max_pdu) {
                return Err(PyValueError::new_err(format!(
                    "max_pdu must be between 4096 and {MAX_PDU_CEILING}"
                )));
            }
            let seconds = |name: &str, v: f64| {
                if v.is_finite() && v >= 0.0 {
                    Ok(Duration::from_secs_f64(v))
                } else {
                    Err(PyValueError::new_err(format!("{name} must be >= 0")))
                }
            };
            let idle = seconds("idle_timeout", idle_timeout)?;
            let artim = seconds("artim_timeout", artim_timeout)?;
            let allowed_calling = allowed_calling
                .unwrap_or_default()
                .iter()
                .map(|s| AllowedCaller::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(PyValueError::new_err)?;
            // ARTIM never outlasts a shorter idle timeout (SPEC.md section 3).
            let artim_timeout = if idle.is_zero() {
                artim
            } else {
                artim.min(idle)
            };
            Ok(CoreConfig {
                settings: Settings {
                    bind,
                    port,
                    accept: AcceptPolicy {
                        ae_title,
                        called_ae_check,
                        allowed_calling,
                        abstract_syntaxes: accepted_sop_classes.into_iter().collect(),
                        transfer_syntaxes: transfer_syntaxes.into_iter().collect::<HashSet<_>>(),
                        max_pdu_length: max_pdu,
                    },
                    max_assoc,
                    idle_timeout: (!idle.is_zero()).then_some(idle),
                    artim_timeout,
                    report_stored,
                },
                store: StoreConfig {
                    root: storage_dir,
                    naming,
                    duplicate,
                    fsync,
                    journal,
                },
            })
        }
    }

    /// One fact reported by the core (see `_core.pyi`).
    #[pyclass(frozen, get_all, module = "storescp._core")]
    struct Event {
        kind: &'static str,
        assoc_id: u64,
        peer: String,
        calling_ae: String,
        called_ae: String,
        reason: String,
        status: u16,
        outcome: &'static str,
        error_comment: String,
        sop_class_uid: String,
        sop_instance_uid: String,
        study_instance_uid: String,
        series_instance_uid: String,
        patient_id: String,
        patient_name: String,
        modality: String,
        study_date: String,
        study_description: String,
        transfer_syntax: String,
        path: String,
        replaced_path: String,
        file_size: u64,
        data_set_bytes: u64,
        journal: String,
        journal_offset: u64,
        ack_token: u64,
    }

    #[pymethods]
    impl Event {
        fn __repr__(&self) -> String {
            format!(
                "Event(kind={:?}, assoc_id={}, outcome={:?}, status=0x{:04X}, sop_instance_uid={:?})",
                self.kind, self.assoc_id, self.outcome, self.status, self.sop_instance_uid
            )
        }
    }

    impl From<events::Event> for Event {
        fn from(e: events::Event) -> Event {
            Event {
                kind: e.kind,
                assoc_id: e.assoc_id,
                peer: e.peer,
                calling_ae: e.calling_ae,
                called_ae: e.called_ae,
                reason: e.reason,
                status: e.status,
                outcome: e.outcome,
                error_comment: e.error_comment,
                sop_class_uid: e.sop_class_uid,
                sop_instance_uid: e.sop_instance_uid,
                study_instance_uid: e.study_instance_uid,
                series_instance_uid: e.series_instance_uid,
                patient_id: e.patient_id,
                patient_name: e.patient_name,
                modality: e.modality,
                study_date: e.study_date,
                study_description: e.study_description,
                transfer_syntax: e.transfer_syntax,
                path: e.path,
                replaced_path: e.replaced_path,
                file_size: e.file_size,
                data_set_bytes: e.data_set_bytes,
                journal: e.journal,
                journal_offset: e.journal_offset,
                ack_token: e.ack_token,
            }
        }
    }

    /// A Storage SCP started from Python.
    #[pyclass(frozen, module = "storescp._core")]
    struct Server {
        config: Py<CoreConfig>,
        running: OnceLock<server::Server>,
    }

    impl Server {
        fn running(&self) -> PyResult<&server::Server> {
            self.running
                .get()
                .ok_or_else(|| PyRuntimeError::new_err("server not started"))
        }
    }

    fn duration(seconds: f64) -> Duration {
        Duration::from_secs_f64(if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        })
    }

    #[pymethods]
    impl Server {
        #[new]
        fn new(config: Py<CoreConfig>) -> Server {
            Server {
                config,
                running: OnceLock::new(),
            }
        }

        /// Binds and starts accepting; returns the bound port. Raises OSError.
        fn start(&self, py: Python<'_>) -> PyResult<u16> {
            if self.running.get().is_some() {
                return Err(PyRuntimeError::new_err("server already started"));
            }
            let config = self.config.get();
            let (settings, store) = (config.settings.clone(), config.store.clone());
            // OSError(errno, strerror[, filename]): filename names the storage directory
            // when that is what failed, and is absent for a bind failure.
            let started = py
                .detach(|| server::Server::start(settings, store))
                .map_err(|e| match e {
                    server::StartError::Storage(root, e) => PyOSError::new_err((
                        e.raw_os_error().unwrap_or(0),
                        e.to_string(),
                        root.to_string_lossy().into_owned(),
                    )),
                    server::StartError::Bind(e) => {
                        PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))
                    }
                })?;
            let port = started.port();
            self.running
                .set(started)
                .map_err(|_| PyRuntimeError::new_err("server already started"))?;
            Ok(port)
        }

        #[getter]
        fn port(&self) -> PyResult<u16> {
            Ok(self.running()?.port())
        }

        /// Waits up to `timeout` for events (GIL released); None once stopped and drained.
        #[pyo3(signature = (timeout, max_events = 4096))]
        fn next_events(
            &self,
            py: Python<'_>,
            timeout: f64,
            max_events: usize,
        ) -> PyResult<Option<Vec<Event>>> {
            let running = self.running()?;
            let batch = py.detach(|| running.next_events(duration(timeout), max_events.max(1)));
            Ok(batch.map(|events| events.into_iter().map(Event::from).collect()))
        }

        /// Acknowledges every store event with ack_token <= upto_token.
        #[pyo3(signature = (upto_token, ok = true))]
        fn ack(&self, upto_token: u64, ok: bool) -> PyResult<()> {
            self.running()?.ack(upto_token, ok);
            Ok(())
        }

        /// Stops accepting; in-flight C-STOREs may finish within drain_timeout.
        #[pyo3(signature = (drain_timeout = 10.0))]
        fn shutdown(&self, drain_timeout: f64) -> PyResult<()> {
            self.running()?.shutdown(duration(drain_timeout));
            Ok(())
        }

        /// The running counters.
        fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            let dict = PyDict::new(py);
            for (name, value) in self.running()?.stats().snapshot() {
                dict.set_item(name, value)?;
            }
            Ok(dict)
        }
    }

    /// The file's path under the storage root; raises ValueError.
    #[pyfunction]
    fn relative_path(
        naming: &str,
        study_uid: &str,
        series_uid: &str,
        sop_uid: &str,
        study_date: &str,
        today: &str,
    ) -> PyResult<String> {
        let scheme = Naming::parse(naming)
            .ok_or_else(|| PyValueError::new_err(format!("unknown naming '{naming}'")))?;
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        naming::relative_path(
            scheme,
            some(study_uid).as_deref(),
            some(series_uid).as_deref(),
            some(sop_uid).as_deref(),
            some(study_date).as_deref(),
            today,
        )
        .map(|named| named.path)
        .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Removes temporary files of dead processes; returns how many.
    #[pyfunction]
    fn sweep_temporaries(py: Python<'_>, storage_dir: PathBuf) -> PyResult<usize> {
        py.detach(|| store::sweep_temporaries(&storage_dir))
            .map_err(|e| PyOSError::new_err(e.to_string()))
    }

    // The per-instance hot paths, callable on bytes for the micro benchmarks
    // (benchmarks/test_micro.py): each runs the code an association runs.

    /// Calls `each` with the type and body of every PDU of `stream`, framed as an
    /// association's reader frames them, each header checked against `max_pdu`; returns
    /// how many. ValueError for an invalid header or a truncated last PDU.
    fn for_each_pdu<'s>(
        stream: &'s [u8],
        max_pdu: usize,
        mut each: impl FnMut(u8, &'s [u8]) -> PyResult<()>,
    ) -> PyResult<usize> {
        let limit = |_: u8| Some(max_pdu);
        let (mut rest, mut count) = (stream, 0);
        while !rest.is_empty() {
            let total = match transport::frame(rest, &limit) {
                Ok(transport::Framed::Whole(total)) => total,
                Ok(transport::Framed::Partial(needed)) => {
                    return Err(PyValueError::new_err(format!(
                        "truncated PDU: {needed} bytes needed, {} left",
                        rest.len()
                    )))
                }
                Err(e) => return Err(PyValueError::new_err(e.to_string())),
            };
            let (pdu, after) = rest.split_at(total);
            each(pdu[0], &pdu[pdu::PDU_HEADER_LEN..])?;
            (rest, count) = (after, count + 1);
        }
        Ok(count)
    }

    /// Frames every PDU of `stream` (see `for_each_pdu`); returns how many.
    #[pyfunction]
    fn frame_pdus(stream: &[u8], max_pdu: usize) -> PyResult<usize> {
        for_each_pdu(stream, max_pdu, |_, _| Ok(()))
    }

    /// Walks the PDV items of every P-DATA-TF of `stream` as an association does: the
    /// command fragments are joined, the data set fragments kept as slices of the PDUs
    /// (not copied). Returns (command set, data set fragments, data set bytes).
    #[pyfunction]
    fn split_p_data<'py>(
        py: Python<'py>,
        stream: &[u8],
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let mut command = Vec::new();
        let mut fragments: Vec<&[u8]> = Vec::new();
        for_each_pdu(stream, usize::MAX, |pdu_type, body| {
            if pdu_type != pdu::pdu_type::P_DATA_TF {
                return Ok(());
            }
            for pdv in pdu::pdvs(body) {
                let pdv = pdv.map_err(|e| PyValueError::new_err(e.to_string()))?;
                if pdv.is_command {
                    command.extend_from_slice(pdv.data);
                } else {
                    fragments.push(pdv.data);
                }
            }
            Ok(())
        })?;
        let bytes = fragments.iter().map(|f| f.len()).sum();
        Ok((PyBytes::new(py, &command), fragments.len(), bytes))
    }

    /// Sniffs `data_set` (in `transfer_syntax`) as an association does while it arrives,
    /// fed `fragment` bytes at a time, the element framing walked to its end; returns
    /// the attributes found, by keyword. Raises ValueError when the data set cannot be
    /// parsed or does not end after a whole element.
    #[pyfunction]
    fn sniff_data_set(
        data_set: &[u8],
        transfer_syntax: &str,
        fragment: usize,
    ) -> PyResult<Vec<(&'static str, String)>> {
        let mut sniffer = Sniffer::validating(Encoding::for_transfer_syntax(transfer_syntax));
        let invalid = |e: SniffError| PyValueError::new_err(e.to_string());
        for chunk in data_set.chunks(fragment.max(1)) {
            sniffer.feed(chunk).map_err(invalid)?;
        }
        let summary = sniffer.finish().map_err(invalid)?;
        let found = [
            ("SOPClassUID", summary.sop_class_uid),
            ("SOPInstanceUID", summary.sop_instance_uid),
            ("StudyDate", summary.study_date),
            ("Modality", summary.modality),
            ("PatientName", summary.patient_name),
            ("PatientID", summary.patient_id),
            ("StudyInstanceUID", summary.study_instance_uid),
            ("SeriesInstanceUID", summary.series_instance_uid),
        ];
        Ok(found
            .into_iter()
            .filter_map(|(keyword, value)| Some((keyword, value?)))
            .collect())
    }

    /// The file meta information (preamble, "DICM", group 0002) written in front of a
    /// stored data set.
    #[pyfunction]
    fn encode_file_meta<'py>(
        py: Python<'py>,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        transfer_syntax_uid: &str,
        source_ae: &str,
    ) -> Bound<'py, PyBytes> {
        let header = meta::encode_file_meta(
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid,
            source_ae,
        );
        PyBytes::new(py, &header)
    }

    #[pymodule]
    fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("IMPLEMENTATION_CLASS_UID", IMPLEMENTATION_CLASS_UID)?;
        m.add("IMPLEMENTATION_VERSION_NAME", IMPLEMENTATION_VERSION_NAME)?;
        m.add("MAX_PDU_LENGTH", MAX_PDU_CEILING)?;
        m.add_class::<CoreConfig>()?;
        m.add_class::<Event>()?;
        m.add_class::<Server>()?;
        m.add_function(wrap_pyfunction!(relative_path, m)?)?;
        m.add_function(wrap_pyfunction!(sweep_temporaries, m)?)?;
        m.add_function(wrap_pyfunction!(frame_pdus, m)?)?;
        m.add_function(wrap_pyfunction!(split_p_data, m)?)?;
        m.add_function(wrap_pyfunction!(sniff_data_set, m)?)?;
        m.add_function(wrap_pyfunction!(encode_file_meta, m)?)?;
        Ok(())
    }
}
