//! One association from A-ASSOCIATE-RQ to release or abort: negotiation, PDV
//! reassembly, the C-ECHO and C-STORE services (PS3.7 9.1, 9.3; PS3.8 9.3.5, annex E),
//! with each data set streamed to its temporary file as it arrives.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::association::{negotiate, AcceptedContext, Negotiation};
use crate::dimse::{self, command_field, status, Command};
use crate::events::{Event, Stats};
use crate::meta::encode_file_meta;
use crate::naming::{relative_path, validate_uid, Naming, RelativePath};
use crate::pdu::{self, abort, pdu_type, reject, PduError};
use crate::server::Shared;
use crate::sniff::{DatasetSummary, Encoding, Sniffer};
use crate::store::{
    local_date_today, Incoming, JournalLine, Outcome, Placed, Spare, FRAGMENTS_PER_WRITE,
};
use crate::transport::{PduReader, ReadError, Waiting};

/// Largest A-ASSOCIATE-RQ accepted (128 contexts with many transfer syntaxes fit).
const MAX_ASSOCIATE_RQ: usize = 1 << 20;
/// How long an idle association polls for its next request before its read sleeps.
const SPIN_FOR_NEXT_REQUEST: Duration = Duration::from_micros(50);
/// Initial size of an association's receive buffer: room for 16 PDUs of 16 KB, whose
/// data set fragments are then written in one call.
const RECEIVE_BUFFER: usize = 256 * 1024;
/// Largest command set accepted; real ones are under 1 KB.
const MAX_COMMAND_SET: usize = 64 * 1024;

/// Identity of an association, for events.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub assoc_id: u64,
    pub addr: String,
    pub calling_ae: String,
    pub called_ae: String,
}

impl Peer {
    fn event(&self, kind: &'static str) -> Event {
        let mut event = Event::new(kind);
        self.name(&mut event);
        event
    }

    /// Fills in the association an event is about.
    fn name(&self, event: &mut Event) {
        event.assoc_id = self.assoc_id;
        event.peer.clone_from(&self.addr);
        event.calling_ae.clone_from(&self.calling_ae);
        event.called_ae.clone_from(&self.called_ae);
    }
}

/// How an association ended, for the closing event.
enum End {
    Released,
    Aborted(String),
}

/// Runs one accepted TCP connection to its end. Never panics on input; every outcome
/// becomes an event.
pub fn run(shared: &Shared, stream: TcpStream, addr: SocketAddr, assoc_id: u64) {
    let mut peer = Peer {
        assoc_id,
        addr: addr.to_string(),
        ..Peer::default()
    };
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut reader = PduReader::new(stream, RECEIVE_BUFFER);
    let Some((contexts, peer_max_pdu)) = establish(shared, &mut reader, &writer, addr, &mut peer)
    else {
        linger(&writer);
        return;
    };
    let mut session = Session {
        shared,
        peer: &peer,
        writer,
        contexts,
        peer_max_pdu,
        command: Vec::new(),
        command_context: None,
        inflight: None,
        spare: None,
        out: Vec::new(),
    };
    let end = session.serve(&mut reader);
    let aborted = matches!(end, End::Aborted(_));
    let event = match end {
        End::Released => peer.event("assoc_released"),
        End::Aborted(reason) => {
            let mut e = peer.event("assoc_aborted");
            e.reason = reason;
            e
        }
    };
    shared.events.push(event);
    if aborted {
        linger(&session.writer);
    }
}

/// How long a busy or refused peer gets to send its A-ASSOCIATE-RQ.
const REJECT_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long we wait for the peer to close after our last PDU, so that it reads the
/// A-ASSOCIATE-RJ or A-ABORT instead of a TCP reset.
const LINGER: Duration = Duration::from_millis(500);

/// Answers a connection over the association limit with A-ASSOCIATE-RJ 2/3/2
/// (transient, service-provider presentation, local limit exceeded).
pub fn reject_busy(shared: &Shared, stream: TcpStream, addr: SocketAddr, assoc_id: u64) {
    let mut peer = Peer {
        assoc_id,
        addr: addr.to_string(),
        ..Peer::default()
    };
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut reader = PduReader::new(stream, 4096);
    let limit = |t: u8| (t == pdu_type::ASSOCIATE_RQ).then_some(MAX_ASSOCIATE_RQ);
    let connected = Instant::now();
    let mut wait =
        |_: Waiting| (connected.elapsed() >= REJECT_READ_TIMEOUT).then(|| "timeout".to_string());
    if let Ok((_, body)) = reader.next_pdu(&limit, &mut wait) {
        if let Ok(rq) = pdu::parse_associate_rq(body) {
            peer.calling_ae = rq.calling_ae;
            peer.called_ae = rq.called_ae;
        }
    }
    send(
        &writer,
        &pdu::encode_associate_rj(
            reject::RESULT_TRANSIENT,
            reject::SOURCE_PROVIDER_PRESENTATION,
            reject::PRESENTATION_LOCAL_LIMIT_EXCEEDED,
        ),
    );
    reject_event(
        shared,
        &peer,
        format!(
            "too many associations (max {}) (2/3/2)",
            shared.settings.max_assoc
        ),
    );
    linger(&writer);
}

/// Half-closes and waits briefly for the peer's close, discarding what it still sends.
fn linger(stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut reader = stream;
    while Instant::now() < deadline {
        match reader.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Reads the A-ASSOCIATE-RQ (within ARTIM) and answers it. Returns the accepted
/// contexts (indexed by ID) and the peer's maximum PDU length, or None when the
/// association was rejected or failed (events already queued).
fn establish(
    shared: &Shared,
    reader: &mut PduReader,
    writer: &TcpStream,
    addr: SocketAddr,
    peer: &mut Peer,
) -> Option<(Vec<Option<AcceptedContext>>, u32)> {
    // ARTIM runs from the connection to the request (PS3.8 9.1.5): a deadline, not an
    // idle timer, so a peer drip-feeding its request cannot hold a slot.
    let artim = shared.settings.artim_timeout;
    let connected = Instant::now();
    let limit = |t: u8| (t == pdu_type::ASSOCIATE_RQ).then_some(MAX_ASSOCIATE_RQ);
    let mut wait = |_: Waiting| {
        if shared.control.is_stopping() {
            Some("server shutting down".to_string())
        } else {
            (connected.elapsed() >= artim)
                .then(|| "no A-ASSOCIATE-RQ before the ARTIM timeout".to_string())
        }
    };
    let rq = match reader.next_pdu(&limit, &mut wait) {
        Ok((_, body)) => pdu::parse_associate_rq(body),
        // A connection closed without a byte (a port probe, a health check) is no
        // association: nothing to report.
        Err(ReadError::Closed) => return None,
        Err(e) => {
            if let ReadError::Protocol { reason, .. } = &e {
                send_abort(writer, *reason);
            }
            let mut event = peer.event("assoc_aborted");
            event.reason = e.to_string();
            shared.events.push(event);
            return None;
        }
    };
    let rq = match rq {
        Ok(rq) => rq,
        Err(e) => {
            refuse_malformed_rq(shared, writer, peer, &e);
            return None;
        }
    };
    peer.calling_ae = rq.calling_ae.clone();
    peer.called_ae = rq.called_ae.clone();
    let decision = if shared.control.is_stopping() {
        // Stopping: no new association (transient: the peer may retry elsewhere/later).
        Negotiation::Reject {
            result: reject::RESULT_TRANSIENT,
            source: reject::SOURCE_PROVIDER_PRESENTATION,
            reason: reject::PRESENTATION_TEMPORARY_CONGESTION,
            why: "server shutting down".into(),
        }
    } else {
        negotiate(&rq, &shared.settings.accept, addr.ip())
    };
    match decision {
        Negotiation::Reject {
            result,
            source,
            reason,
            why,
        } => {
            send(writer, &pdu::encode_associate_rj(result, source, reason));
            reject_event(shared, peer, format!("{why} ({result}/{source}/{reason})"));
            None
        }
        Negotiation::Accept { ac, contexts } => {
            if !send(writer, &pdu::encode_associate_ac(&ac)) {
                return None;
            }
            Stats::add(&shared.stats.associations, 1);
            let mut event = peer.event("assoc_accepted");
            event.reason = format!("{} presentation context(s) accepted", contexts.len());
            shared.events.push(event);
            let mut by_id: Vec<Option<AcceptedContext>> = vec![None; 256];
            for c in contexts {
                let id = usize::from(c.id);
                by_id[id] = Some(c);
            }
            Some((by_id, rq.user_info.max_pdu_length.unwrap_or(0)))
        }
    }
}

/// An unparseable A-ASSOCIATE-RQ: RJ 1/2/2 for a protocol version we lack (PS3.8
/// 9.3.4), A-ABORT with the PS3.8 reason for anything else.
fn refuse_malformed_rq(shared: &Shared, writer: &TcpStream, peer: &Peer, e: &PduError) {
    if matches!(e, PduError::ProtocolVersion(_)) {
        send(
            writer,
            &pdu::encode_associate_rj(
                reject::RESULT_PERMANENT,
                reject::SOURCE_PROVIDER_ACSE,
                reject::ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
            ),
        );
        reject_event(shared, peer, format!("{e} (1/2/2)"));
    } else {
        send_abort(writer, e.abort_reason());
        let mut event = peer.event("assoc_aborted");
        event.reason = format!("malformed A-ASSOCIATE-RQ: {e}");
        shared.events.push(event);
    }
}

fn reject_event(shared: &Shared, peer: &Peer, reason: String) {
    Stats::add(&shared.stats.rejected_associations, 1);
    let mut event = peer.event("assoc_rejected");
    event.reason = reason;
    shared.events.push(event);
}

/// Writes a whole PDU; false when the connection is gone.
fn send(mut writer: &TcpStream, bytes: &[u8]) -> bool {
    writer.write_all(bytes).is_ok()
}

/// Sends an A-ABORT from the service provider (PS3.8 9.3.8) with `reason`.
pub fn send_abort(writer: &TcpStream, reason: u8) {
    send(
        writer,
        &pdu::encode_abort(abort::SOURCE_SERVICE_PROVIDER, reason),
    );
}

/// The data set being received for the current request.
enum Receiving<'a> {
    /// A C-STORE data set, streamed to `incoming` and sniffed on the way.
    Store {
        incoming: Option<Incoming>,
        sniffer: Box<Sniffer>,
        /// A failure decided before the data set ended (status, Error Comment).
        failure: Option<(u16, String)>,
        ahead: Ahead<'a>,
    },
    /// The data set of a request we do not support: read and dropped.
    Discard,
}

/// The journal line of a C-STORE, written while its data set still arrives so that
/// its write to the device overlaps the transfer.
enum Ahead<'a> {
    /// Wanted as soon as the sniffed attributes name the file.
    Wanted,
    Written(JournalLine<'a>),
    /// No journal, or not written ahead (the commit then writes it).
    Not,
}

impl<'a> Ahead<'a> {
    fn into_line(self) -> Option<JournalLine<'a>> {
        match self {
            Ahead::Written(line) => Some(line),
            Ahead::Wanted | Ahead::Not => None,
        }
    }
}

struct InFlight<'a> {
    context_id: u8,
    command: Command,
    receiving: Receiving<'a>,
    bytes: u64,
}

/// Data set fragments of one instance not yet written: they point into the receive
/// buffer, so those of several buffered PDUs go to the file in one call.
struct Fragments<'b> {
    parts: [&'b [u8]; FRAGMENTS_PER_WRITE],
    len: usize,
}

impl<'b> Fragments<'b> {
    fn new() -> Fragments<'b> {
        Fragments {
            parts: [&[]; FRAGMENTS_PER_WRITE],
            len: 0,
        }
    }

    /// Holds `data` back; false when full.
    fn push(&mut self, data: &'b [u8]) -> bool {
        let Some(part) = self.parts.get_mut(self.len) else {
            return false;
        };
        *part = data;
        self.len += 1;
        true
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Writes the fragments to `incoming` and clears them. A failure is recorded and
    /// drops the temporary file; the rest of the data set is then read and discarded.
    fn write_to(&mut self, incoming: &mut Option<Incoming>, failure: &mut Option<(u16, String)>) {
        if let (Some(file), None) = (incoming.as_mut(), failure.as_ref()) {
            if let Err(e) = file.write(&self.parts[..self.len]) {
                *failure = Some((
                    status::OUT_OF_RESOURCES,
                    format!("cannot write data set: {e}"),
                ));
                *incoming = None;
            }
        }
        self.clear();
    }
}

/// An established association.
struct Session<'a> {
    shared: &'a Shared,
    peer: &'a Peer,
    writer: TcpStream,
    contexts: Vec<Option<AcceptedContext>>,
    peer_max_pdu: u32,
    command: Vec<u8>,
    command_context: Option<u8>,
    inflight: Option<InFlight<'a>>,
    /// The temporary file of the next C-STORE, opened after the last one was answered.
    spare: Option<Spare>,
    out: Vec<u8>,
}

/// A reason to end the association with an A-ABORT.
struct Abort {
    reason: u8,
    message: String,
}

impl Abort {
    fn new(reason: u8, message: impl Into<String>) -> Abort {
        Abort {
            reason,
            message: message.into(),
        }
    }
}

impl<'a> Session<'a> {
    /// Serves PDUs until release, abort, loss or shutdown.
    fn serve(&mut self, reader: &mut PduReader) -> End {
        let max_pdu = self.shared.settings.accept.max_pdu_length as usize;
        let limit = |t: u8| match t {
            pdu_type::P_DATA_TF => Some(max_pdu),
            pdu_type::RELEASE_RQ | pdu_type::A_ABORT => Some(4),
            _ => None,
        };
        loop {
            let busy = self.inflight.is_some() || !self.command.is_empty();
            // Between messages the next request usually follows our response within
            // microseconds; polling for it pays only while this association has a core
            // to itself.
            let alone = self.shared.active_associations() <= 1;
            reader.spin = if !busy && alone {
                SPIN_FOR_NEXT_REQUEST
            } else {
                Duration::ZERO
            };
            reader.mid_message = busy;
            let shared = self.shared;
            let idle_timeout = shared.settings.idle_timeout;
            let mut wait = |w: Waiting| {
                if shared.control.is_hard_stopped() {
                    return Some("server shutting down: drain time exceeded".to_string());
                }
                if shared.control.is_stopping() && !busy && !w.mid_pdu {
                    return Some("server shutting down".to_string());
                }
                idle_timeout
                    .filter(|t| w.idle >= *t)
                    .map(|t| format!("idle timeout ({} s)", t.as_secs()))
            };
            let pdus = match reader.next_pdus(&limit, &mut wait) {
                Ok(pdus) => pdus,
                Err(e) => {
                    if let ReadError::Protocol { reason, .. } = &e {
                        send_abort(&self.writer, *reason);
                    } else if let ReadError::Stopped(_) = &e {
                        send_abort(&self.writer, abort::REASON_NOT_SPECIFIED);
                    }
                    return End::Aborted(e.to_string());
                }
            };
            let mut fragments = Fragments::new();
            for (pdu_type, body) in pdus {
                let step = match pdu_type {
                    pdu_type::P_DATA_TF => self.p_data(body, &mut fragments),
                    pdu_type::RELEASE_RQ => {
                        let discarded = self.inflight.take().is_some();
                        send(&self.writer, &pdu::encode_release_rp());
                        return if discarded {
                            End::Aborted(
                                "released during a transfer; partial data discarded".into(),
                            )
                        } else {
                            End::Released
                        };
                    }
                    _ => {
                        let (source, reason) = pdu::parse_abort(body).unwrap_or((0, 0));
                        return End::Aborted(format!(
                            "A-ABORT from peer (source {source}, reason {reason})"
                        ));
                    }
                };
                match step {
                    Ok(true) => {}
                    Ok(false) => return End::Aborted("connection lost while responding".into()),
                    Err(a) => {
                        send_abort(&self.writer, a.reason);
                        return End::Aborted(a.message);
                    }
                }
            }
            self.write_fragments(&mut fragments);
        }
    }

    /// Handles the PDVs of one P-DATA-TF; data set fragments join `fragments`, written
    /// when it is full, at the data set's end, or after the last PDU buffered. Ok(false):
    /// the peer is gone.
    fn p_data<'b>(&mut self, body: &'b [u8], fragments: &mut Fragments<'b>) -> Result<bool, Abort> {
        for pdv in pdu::pdvs(body) {
            let pdv = pdv.map_err(|e| Abort::new(e.abort_reason(), e.to_string()))?;
            if self.context(pdv.context_id).is_none() {
                return Err(Abort::new(
                    abort::INVALID_PDU_PARAMETER_VALUE,
                    format!(
                        "P-DATA on presentation context {} which was not accepted",
                        pdv.context_id
                    ),
                ));
            }
            let alive = if pdv.is_command {
                self.command_fragment(pdv.context_id, pdv.data, pdv.is_last)?
            } else {
                self.data_fragment(pdv.context_id, pdv.data, pdv.is_last, fragments)?
            };
            if !alive {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn context(&self, id: u8) -> Option<&AcceptedContext> {
        self.contexts.get(usize::from(id)).and_then(Option::as_ref)
    }

    fn command_fragment(&mut self, context_id: u8, data: &[u8], last: bool) -> Result<bool, Abort> {
        if self.inflight.is_some() {
            return Err(Abort::new(
                abort::UNEXPECTED_PDU_PARAMETER,
                "command fragment received while a data set was expected",
            ));
        }
        if *self.command_context.get_or_insert(context_id) != context_id {
            return Err(Abort::new(
                abort::UNEXPECTED_PDU_PARAMETER,
                "command fragments on different presentation contexts",
            ));
        }
        if self.command.len() + data.len() > MAX_COMMAND_SET {
            return Err(Abort::new(
                abort::INVALID_PDU_PARAMETER_VALUE,
                "command set larger than 64 KiB",
            ));
        }
        self.command.extend_from_slice(data);
        if !last {
            return Ok(true);
        }
        let parsed = dimse::parse_command(&self.command);
        self.command.clear();
        self.command_context = None;
        let command = parsed.map_err(|e| {
            Abort::new(
                abort::INVALID_PDU_PARAMETER_VALUE,
                format!("malformed command set: {e}"),
            )
        })?;
        Stats::add(&self.shared.stats.messages, 1);
        self.dispatch(context_id, command)
    }

    /// Starts or answers a request. Returns false when the peer is gone.
    fn dispatch(&mut self, context_id: u8, command: Command) -> Result<bool, Abort> {
        if self.shared.control.is_stopping() {
            // Draining: what is in flight finishes, nothing new starts; a release
            // request after the last response is still answered (see `serve`).
            return Err(Abort::new(
                abort::REASON_NOT_SPECIFIED,
                "server shutting down",
            ));
        }
        Ok(match command.command_field {
            command_field::C_ECHO_RQ => {
                let rsp = dimse::encode_c_echo_rsp(command.message_id, status::SUCCESS);
                let mut event = self.peer.event("echo");
                event.status = status::SUCCESS;
                self.shared.events.push(event);
                self.respond(context_id, &rsp)
            }
            command_field::C_STORE_RQ if command.has_data_set() => {
                let spare = self.spare.take();
                let receiving = self.begin_store(context_id, &command, spare);
                self.inflight = Some(InFlight {
                    context_id,
                    command,
                    receiving,
                    bytes: 0,
                });
                true
            }
            field if command.has_data_set() && field & 0x8000 == 0 => {
                self.inflight = Some(InFlight {
                    context_id,
                    command,
                    receiving: Receiving::Discard,
                    bytes: 0,
                });
                true
            }
            _ => self.refuse_command(context_id, &command),
        })
    }

    /// Answers a request this SCP does not perform (or a C-STORE without data set).
    fn refuse_command(&mut self, context_id: u8, command: &Command) -> bool {
        if command.command_field & 0x8000 != 0 {
            // A response sent to an SCP answers nothing of ours: ignore it.
            return true;
        }
        let (code, comment) = if command.command_field == command_field::C_STORE_RQ {
            (status::CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
        } else {
            (
                status::UNRECOGNIZED_OPERATION,
                "this Storage SCP performs only C-STORE and C-ECHO",
            )
        };
        let mut event = self.peer.event("error");
        event.status = code;
        event.reason = format!("refused command 0x{:04X}: {comment}", command.command_field);
        self.shared.events.push(event);
        let rsp = dimse::encode_failure_rsp(command, code, comment);
        self.respond(context_id, &rsp)
    }

    /// Receiving of a C-STORE's data set, into `spare` when there is one (a refused
    /// request closes it).
    fn begin_store(
        &self,
        context_id: u8,
        command: &Command,
        spare: Option<Spare>,
    ) -> Receiving<'a> {
        let (abstract_syntax, transfer_syntax) = match self.context(context_id) {
            Some(c) => (c.abstract_syntax.as_str(), c.transfer_syntax.as_str()),
            None => ("", ""),
        };
        let sniffer = Box::new(Sniffer::validating(Encoding::for_transfer_syntax(
            transfer_syntax,
        )));
        let sop_class = command
            .affected_sop_class_uid
            .as_deref()
            .unwrap_or_default();
        let sop_instance = command
            .affected_sop_instance_uid
            .as_deref()
            .unwrap_or_default();
        let refuse = |code: u16, comment: String| Receiving::Store {
            incoming: None,
            sniffer: Box::new(Sniffer::new(Encoding::for_transfer_syntax(transfer_syntax))),
            failure: Some((code, comment)),
            ahead: Ahead::Not,
        };
        if sop_class != abstract_syntax {
            return refuse(
                status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                format!(
                    "Affected SOP Class UID {sop_class} differs from the presentation context's {abstract_syntax}"
                ),
            );
        }
        if let Err(e) = validate_uid("Affected SOP Instance UID", Some(sop_instance)) {
            return refuse(status::CANNOT_UNDERSTAND, e.to_string());
        }
        let header = encode_file_meta(
            sop_class,
            sop_instance,
            transfer_syntax,
            &self.peer.calling_ae,
        );
        let incoming = match spare {
            Some(spare) => self.shared.store.begin_in(spare, &header),
            None => self.shared.store.begin(&header),
        };
        match incoming {
            Ok(incoming) => Receiving::Store {
                incoming: Some(incoming),
                sniffer,
                failure: None,
                ahead: if self.shared.store.config().journal {
                    Ahead::Wanted
                } else {
                    Ahead::Not
                },
            },
            Err(e) => refuse(
                status::OUT_OF_RESOURCES,
                format!("cannot create temporary file: {e}"),
            ),
        }
    }

    fn data_fragment<'b>(
        &mut self,
        context_id: u8,
        data: &'b [u8],
        last: bool,
        fragments: &mut Fragments<'b>,
    ) -> Result<bool, Abort> {
        let Some(inflight) = self.inflight.as_mut() else {
            return Err(Abort::new(
                abort::UNEXPECTED_PDU_PARAMETER,
                "data set fragment without a preceding command",
            ));
        };
        if inflight.context_id != context_id {
            return Err(Abort::new(
                abort::UNEXPECTED_PDU_PARAMETER,
                "data set fragment on another presentation context than its command",
            ));
        }
        inflight.bytes += data.len() as u64;
        if let Receiving::Store {
            incoming,
            sniffer,
            failure,
            ahead,
        } = &mut inflight.receiving
        {
            if failure.is_none() {
                if incoming.is_some() && !fragments.push(data) {
                    fragments.write_to(incoming, failure);
                    fragments.push(data); // room again: the write cleared them
                }
                if !sniffer.is_done() {
                    // A sniff error surfaces again from finish(); keep receiving meanwhile.
                    let _ = sniffer.feed(data);
                }
                if matches!(ahead, Ahead::Wanted) {
                    if let Some(summary) = sniffer.settled_summary() {
                        let store = &self.shared.store;
                        *ahead = file_name(store.config().naming, summary)
                            .ok()
                            .and_then(|named| {
                                store.journal_ahead(named.sop_instance_uid, &named.path)
                            })
                            .map_or(Ahead::Not, Ahead::Written);
                    }
                }
            }
        }
        if !last {
            return Ok(true);
        }
        self.write_fragments(fragments);
        let Some(done) = self.inflight.take() else {
            return Ok(true);
        };
        Ok(self.finish(done))
    }

    /// Writes the fragments held back to the instance being received.
    fn write_fragments(&mut self, fragments: &mut Fragments<'_>) {
        match self.inflight.as_mut() {
            Some(InFlight {
                receiving:
                    Receiving::Store {
                        incoming, failure, ..
                    },
                ..
            }) => fragments.write_to(incoming, failure),
            _ => fragments.clear(),
        }
    }

    /// The whole data set has arrived: decide, commit, answer.
    fn finish(&mut self, done: InFlight) -> bool {
        let stats = &self.shared.stats;
        let command = done.command;
        let Receiving::Store {
            incoming,
            sniffer,
            failure,
            ahead,
        } = done.receiving
        else {
            return self.refuse_command(done.context_id, &command);
        };
        Stats::add(&stats.images_received, 1);
        Stats::add(&stats.bytes_received, done.bytes);
        // Named (association, command, transfer syntax) only once it is to be queued: a
        // quiet receiver's successes never are.
        let mut event = Event::new("store");
        event.data_set_bytes = done.bytes;

        let verdict = match (failure, incoming) {
            (Some(f), _) => Err(f),
            (None, None) => Err((status::OUT_OF_RESOURCES, "no temporary file".into())),
            (None, Some(incoming)) => match sniffer.finish() {
                Err(e) => Err((
                    status::CANNOT_UNDERSTAND,
                    format!("cannot parse data set: {e}"),
                )),
                Ok(summary) => {
                    let placed = self.commit(&command, &summary, incoming, ahead.into_line());
                    describe(&mut event, summary);
                    placed
                }
            },
        };
        let (code, comment) = match verdict {
            Ok(placed) if placed.is_journaled() => {
                self.name_store_event(&mut event, &command, done.context_id);
                match self.index_while_durable(event, placed) {
                    Some(answer) => answer,
                    None => return false,
                }
            }
            verdict => {
                let verdict = verdict.and_then(|placed| {
                    let settled = placed.report();
                    placed
                        .make_durable()
                        .map(|()| settled)
                        .map_err(storage_failure)
                });
                self.settle(&mut event, verdict);
                let answer = (event.status, event.error_comment.clone());
                if answer.0 != status::SUCCESS || self.shared.settings.report_stored {
                    self.name_store_event(&mut event, &command, done.context_id);
                    self.shared.events.push(event);
                }
                answer
            }
        };
        let rsp = dimse::encode_c_store_rsp(
            command.message_id,
            command
                .affected_sop_class_uid
                .as_deref()
                .unwrap_or_default(),
            command
                .affected_sop_instance_uid
                .as_deref()
                .unwrap_or_default(),
            code,
            (code != status::SUCCESS).then_some(comment.as_str()),
        );
        let sent = self.respond(done.context_id, &rsp);
        if sent && self.spare.is_none() {
            // A failure here shows again, with its status, when the next C-STORE begins.
            self.spare = self.shared.store.spare().ok().flatten();
        }
        if sent && self.shared.active_associations() <= 1 {
            // Alone, this association has a core to spare while the peer prepares its
            // next request. A failure only leaves the next new study to make its folders.
            let _ = self.shared.store.prepare_folders();
        }
        sent
    }

    /// Fills in who sent a store event, for what, and in which transfer syntax.
    fn name_store_event(&self, event: &mut Event, command: &Command, context_id: u8) {
        self.peer.name(event);
        let uid = |uid: &Option<String>| uid.clone().unwrap_or_default();
        event.sop_class_uid = uid(&command.affected_sop_class_uid);
        event.sop_instance_uid = uid(&command.affected_sop_instance_uid);
        if let Some(context) = self.context(context_id) {
            event.transfer_syntax.clone_from(&context.transfer_syntax);
        }
    }

    /// Names the file, checks the data set against the command, and commits.
    fn commit(
        &self,
        command: &Command,
        summary: &DatasetSummary,
        incoming: Incoming,
        ahead: Option<JournalLine<'a>>,
    ) -> Result<Placed<'a>, (u16, String)> {
        let store = &self.shared.store;
        let RelativePath {
            path: relpath,
            sop_instance_uid: sop_uid,
        } = file_name(store.config().naming, summary)?;
        let mismatch = |what: &str, data_set: &str, command: &str| {
            (
                status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                format!("{what} in the data set ({data_set}) differs from the command's Affected {what} ({command})"),
            )
        };
        let command_sop = command
            .affected_sop_instance_uid
            .as_deref()
            .unwrap_or_default();
        if command_sop != sop_uid {
            return Err(mismatch("SOP Instance UID", sop_uid, command_sop));
        }
        if let (Some(data_set), Some(cmd)) = (
            summary.sop_class_uid.as_deref(),
            command.affected_sop_class_uid.as_deref(),
        ) {
            if data_set != cmd {
                return Err(mismatch("SOP Class UID", data_set, cmd));
            }
        }
        store
            .commit(incoming, &relpath, sop_uid, ahead)
            .map_err(storage_failure)
    }

    /// Fills the event's outcome, status and Error Comment, and counts it.
    fn settle(&self, event: &mut Event, verdict: Result<(Outcome, u64, String), (u16, String)>) {
        let stats = &self.shared.stats;
        let (outcome, file_size, relpath) = match verdict {
            Err((code, comment)) => {
                event.status = code;
                event.outcome = if code == status::OUT_OF_RESOURCES {
                    "failed"
                } else {
                    "refused"
                };
                event.error_comment = comment;
                Stats::add(&stats.failures, 1);
                return;
            }
            Ok(placed) => placed,
        };
        event.path = relpath;
        event.file_size = file_size;
        event.status = status::SUCCESS;
        match outcome {
            Outcome::Stored => event.outcome = "stored",
            Outcome::Replaced(old) => {
                event.outcome = "replaced";
                event.replaced_path = old;
                Stats::add(&stats.duplicates, 1);
            }
            Outcome::Ignored(old) => {
                event.outcome = "ignored";
                event.replaced_path = old;
                Stats::add(&stats.duplicates, 1);
            }
            Outcome::Duplicate(old) => {
                event.outcome = "duplicate";
                event.status = status::DUPLICATE_SOP_INSTANCE;
                event.error_comment = format!("SOP Instance UID already stored as {old}");
                event.replaced_path = old;
                Stats::add(&stats.duplicates, 1);
            }
        }
        if matches!(event.outcome, "stored" | "replaced") {
            Stats::add(&stats.instances_stored, 1);
            Stats::add(&stats.stored_bytes, file_size);
        }
    }

    /// Queues the event of a journaled instance, placed under its final name, so that
    /// Python commits its index row while the directory entries are made durable; then
    /// waits for both. Returns the status to answer, or None when the server stops first.
    fn index_while_durable(&self, mut event: Event, placed: Placed<'_>) -> Option<(u16, String)> {
        let shared = self.shared;
        self.settle(&mut event, Ok(placed.report()));
        event.journal = shared.store.journal_name();
        let token = placed.publish(|watermark| {
            event.journal_offset = watermark;
            shared.events.push_for_ack(event)
        });
        let durable = placed.make_durable();
        let indexed = shared
            .events
            .wait_ack(token, &|| shared.control.is_hard_stopped());
        let failure = |reason: String, answer: (u16, String)| {
            Stats::add(&shared.stats.failures, 1);
            let mut error = self.peer.event("error");
            error.reason = reason;
            shared.events.push(error);
            Some(answer)
        };
        match (indexed, durable) {
            (None, _) => {
                send_abort(&self.writer, abort::REASON_NOT_SPECIFIED);
                None
            }
            (Some(false), _) => failure(
                "index commit failed; the file is kept and reconciled at next start".into(),
                (status::OUT_OF_RESOURCES, "index commit failed".into()),
            ),
            // The file and its row stay (they agree); only its directory entry may not
            // survive a power loss, which the journal replay would then repair.
            (Some(true), Err(e)) => {
                let (code, comment) = storage_failure(e);
                failure(format!("C-STORE failed: {comment}"), (code, comment))
            }
            (Some(true), Ok(())) => Some((status::SUCCESS, String::new())),
        }
    }

    /// Sends a command set as P-DATA-TF fragments within the peer's maximum PDU length.
    fn respond(&mut self, context_id: u8, command: &[u8]) -> bool {
        self.out.clear();
        pdu::encode_message_fragments(&mut self.out, context_id, true, command, self.peer_max_pdu);
        send(&self.writer, &self.out)
    }
}

/// The file's path under `naming` and the validated SOP Instance UID, from the sniffed
/// attributes; a C000 refusal when they cannot name a file (SPEC.md section 4).
fn file_name(naming: Naming, summary: &DatasetSummary) -> Result<RelativePath<'_>, (u16, String)> {
    let today = if naming == Naming::Date {
        local_date_today()
    } else {
        String::new()
    };
    let refused = |e: crate::naming::NamingError| (status::CANNOT_UNDERSTAND, e.to_string());
    relative_path(
        naming,
        summary.study_instance_uid.as_deref(),
        summary.series_instance_uid.as_deref(),
        summary.sop_instance_uid.as_deref(),
        summary.study_date.as_deref(),
        &today,
    )
    .map_err(refused)
}

/// The status and Error Comment of a storage failure (SPEC.md section 4).
fn storage_failure(e: io::Error) -> (u16, String) {
    (status::OUT_OF_RESOURCES, format!("cannot store: {e}"))
}

/// Moves the sniffed attributes into a store event.
fn describe(event: &mut Event, summary: DatasetSummary) {
    event.study_instance_uid = summary.study_instance_uid.unwrap_or_default();
    event.series_instance_uid = summary.series_instance_uid.unwrap_or_default();
    event.patient_id = summary.patient_id.unwrap_or_default();
    event.patient_name = summary.patient_name.unwrap_or_default();
    event.modality = summary.modality.unwrap_or_default();
    event.study_date = summary.study_date.unwrap_or_default();
    event.study_description = summary.study_description.unwrap_or_default();
}
