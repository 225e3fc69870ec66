//! One association of the load generator: A-ASSOCIATE-RQ, a run of synchronous C-STOREs,
//! A-RELEASE (PS3.8 7.1-7.2, 9.3; PS3.7 9.1.1 and 9.3.1).
//!
//! The A-ASSOCIATE-RQ, the command sets and their P-DATA-TF PDUs are encoded by the core
//! crate (`pdu`, `dimse`). The data set is never copied: each fragment goes out as a 12-byte
//! P-DATA-TF + PDV header (PS3.8 9.3.5, Annex E.2) followed by a slice of the file bytes, many
//! fragments per `writev` call. [`pdata_header`] is checked against the core's
//! `encode_p_data` by a unit test.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use _core::{dimse, pdu, transport};

use crate::part10::Instance;

/// The C-STORE-RQ priority: MEDIUM (PS3.7 9.1.1.1, Table 9.3-1: 0000H).
const PRIORITY_MEDIUM: u16 = 0;
/// The receive limit this sender announces: C-STORE-RSPs are ~150 bytes.
const OWN_MAX_PDU: u32 = 16384;
/// Upper bound on the data set fragments written by one `writev` (well under IOV_MAX).
const FRAGMENTS_PER_WRITE: usize = 256;
/// Upper bound on the bytes written by one `writev`.
const BYTES_PER_WRITE: usize = 8 << 20;
/// Bytes in front of every data set fragment: PDU header (6) + PDV item header (6).
const PDATA_HEADER_LEN: usize = 12;
/// Implementation Class UID of this load generator (2.25 root, fixed).
const IMPLEMENTATION_CLASS_UID: &str = "2.25.302125316436587213096447393212367463228";

/// A presentation context this sender proposes: one per (SOP class, transfer syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// Odd presentation context ID (PS3.8 9.3.2.2).
    pub id: u8,
    /// The SOP class UID.
    pub abstract_syntax: String,
    /// The one transfer syntax proposed, the file's own.
    pub transfer_syntax: String,
}

/// One message to send: the instance and its pre-encoded command PDU(s).
#[derive(Debug)]
pub struct Message<'a> {
    /// The instance whose data set follows the command.
    pub instance: &'a Instance,
    /// Presentation context ID the instance goes on.
    pub context_id: u8,
    /// Message ID used in the command set.
    pub message_id: u16,
    /// The P-DATA-TF PDU(s) carrying the C-STORE-RQ command set.
    pub command_pdus: Vec<u8>,
}

/// What one association did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// C-STORE-RSPs with status 0000.
    pub succeeded: u64,
    /// C-STORE-RSPs with any other status.
    pub failed: u64,
    /// Instances not sent because their presentation context was not accepted.
    pub not_sent: u64,
    /// Data set bytes of the instances answered with success.
    pub dataset_bytes: u64,
    /// Bytes written to the socket (PDU headers, commands, data sets).
    pub wire_bytes: u64,
    /// Round-trip time of each C-STORE (first byte written to response parsed), microseconds.
    pub latencies_us: Vec<u32>,
    /// The first non-success statuses seen, as (status, SOP instance UID), at most 5.
    pub failure_examples: Vec<(u16, String)>,
    /// The error that ended the association early, if any.
    pub error: Option<String>,
}

/// Connection and negotiation parameters shared by all associations.
#[derive(Debug, Clone)]
pub struct Params {
    /// host:port to connect to.
    pub address: String,
    /// Called AE title.
    pub called_ae: String,
    /// Calling AE title.
    pub calling_ae: String,
    /// Largest P-DATA-TF body this sender writes; 0: whatever the acceptor allows.
    pub max_pdu: u32,
    /// All presentation contexts proposed.
    pub contexts: Vec<Context>,
    /// Socket read timeout.
    pub timeout: Duration,
    /// Nagle's algorithm left on and every PDU written in pieces (see `send_in_pieces`).
    pub nagle: bool,
}

/// Encodes the P-DATA-TF PDU header and PDV item header for one fragment of `len` bytes
/// (PS3.8 9.3.5: type 04H, reserved, PDU length; 9.3.5.1: item length, presentation context
/// ID; E.2: message control header, bit 0 command, bit 1 last fragment).
pub fn pdata_header(context_id: u8, is_command: bool, is_last: bool, len: u32) -> [u8; 12] {
    let item_len = len.saturating_add(2);
    let pdu_len = item_len.saturating_add(4);
    let mut header = [0u8; PDATA_HEADER_LEN];
    header[0] = pdu::pdu_type::P_DATA_TF;
    header[2..6].copy_from_slice(&pdu_len.to_be_bytes());
    header[6..10].copy_from_slice(&item_len.to_be_bytes());
    header[10] = context_id;
    header[11] = u8::from(is_command) | (u8::from(is_last) << 1);
    header
}

/// The data bytes one fragment may carry under a P-DATA-TF body limit (0 = unlimited).
fn fragment_capacity(limit: u32) -> usize {
    // PS3.8 D.1: the limit is the PDU's variable field, which includes the PDV item's
    // length (4), context ID (1) and message control header (1).
    let limit = if limit == 0 { u32::MAX } else { limit };
    (limit.saturating_sub(6).max(1) as usize).min(u32::MAX as usize - 6)
}

/// The P-DATA-TF body limit to send with: the smaller of ours and the acceptor's (0 = none).
pub fn effective_limit(ours: u32, theirs: u32) -> u32 {
    match (ours, theirs) {
        (0, t) => t,
        (o, 0) => o,
        (o, t) => o.min(t),
    }
}

/// Encodes the C-STORE-RQ command PDUs of one message.
pub fn encode_command(
    instance: &Instance,
    context_id: u8,
    message_id: u16,
    max_pdu: u32,
) -> Vec<u8> {
    let command = dimse::encode_c_store_rq(
        message_id,
        &instance.sop_class_uid,
        &instance.sop_instance_uid,
        PRIORITY_MEDIUM,
    );
    let mut out = Vec::with_capacity(command.len() + 64);
    pdu::encode_message_fragments(&mut out, context_id, true, &command, max_pdu);
    out
}

fn io_err(what: &str, e: io::Error) -> String {
    format!("{what}: {e}")
}

/// Reads one whole PDU: (type, body). `body` is reused between calls.
fn read_pdu(reader: &mut impl Read, body: &mut Vec<u8>) -> Result<u8, String> {
    let mut header = [0u8; 6];
    reader
        .read_exact(&mut header)
        .map_err(|e| io_err("reading PDU header", e))?;
    let (pdu_type, len) =
        pdu::parse_pdu_header(&header).map_err(|e| format!("bad PDU header: {e}"))?;
    // Responses of a C-STORE SCP are small; refuse anything absurd rather than allocate it.
    if len > 64 << 20 {
        return Err(format!(
            "PDU of type {pdu_type:#04x} announces {len} bytes; refusing"
        ));
    }
    body.clear();
    body.resize(len as usize, 0);
    reader
        .read_exact(body)
        .map_err(|e| io_err("reading PDU body", e))?;
    Ok(pdu_type)
}

fn describe_unexpected(pdu_type: u8, body: &[u8]) -> String {
    match pdu_type {
        pdu::pdu_type::A_ABORT => match pdu::parse_abort(body) {
            Ok((source, reason)) => format!("A-ABORT received (source {source}, reason {reason})"),
            Err(e) => format!("A-ABORT received ({e})"),
        },
        pdu::pdu_type::ASSOCIATE_RJ => match pdu::parse_associate_rj(body) {
            Ok((result, source, reason)) => format!(
                "A-ASSOCIATE-RJ received (result {result}, source {source}, reason {reason})"
            ),
            Err(e) => format!("A-ASSOCIATE-RJ received ({e})"),
        },
        other => format!("unexpected {} PDU", pdu::pdu_type_name(other)),
    }
}

/// Writes every slice in `slices` completely, with as few `writev` calls as the kernel allows.
fn write_all_vectored(stream: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends the command PDUs and the data set of one message; returns the bytes written.
fn send_message(
    stream: &mut TcpStream,
    message: &Message<'_>,
    capacity: usize,
    headers: &mut Vec<[u8; PDATA_HEADER_LEN]>,
) -> io::Result<u64> {
    let dataset = message.instance.dataset();
    let mut written = message.command_pdus.len() as u64;
    let mut first = true;
    let mut chunks = dataset.chunks(capacity).peekable();
    if dataset.is_empty() {
        // An empty data set still needs its last fragment (PS3.7 9.3.1: the data set follows).
        let header = pdata_header(message.context_id, false, true, 0);
        stream.write_all(&message.command_pdus)?;
        stream.write_all(&header)?;
        return Ok(written + PDATA_HEADER_LEN as u64);
    }
    while chunks.peek().is_some() {
        // Headers first (the IoSlices borrow them), then the slices.
        headers.clear();
        let mut batch: Vec<&[u8]> = Vec::with_capacity(FRAGMENTS_PER_WRITE);
        let mut batch_bytes = 0usize;
        while let Some(chunk) = chunks.next() {
            let is_last = chunks.peek().is_none();
            headers.push(pdata_header(
                message.context_id,
                false,
                is_last,
                chunk.len() as u32,
            ));
            batch.push(chunk);
            batch_bytes += chunk.len() + PDATA_HEADER_LEN;
            if batch.len() >= FRAGMENTS_PER_WRITE || batch_bytes >= BYTES_PER_WRITE {
                break;
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * batch.len() + 1);
        if first {
            slices.push(IoSlice::new(&message.command_pdus));
            first = false;
        }
        for (header, chunk) in headers.iter().zip(&batch) {
            slices.push(IoSlice::new(header));
            slices.push(IoSlice::new(chunk));
        }
        write_all_vectored(stream, &mut slices)?;
        written += batch_bytes as u64;
    }
    Ok(written)
}

/// Sends one message as dcmtk's storescu writes it: every P-DATA-TF, of the command and
/// of the data set, as its 12 header bytes (PDU and PDV item headers) and then the PDV's
/// value, with a write each. With Nagle's algorithm on, the kernel holds each piece back
/// until the one before is acknowledged.
fn send_in_pieces(
    stream: &mut TcpStream,
    message: &Message<'_>,
    capacity: usize,
) -> io::Result<u64> {
    let mut commands = message.command_pdus.as_slice();
    while !commands.is_empty() {
        // Our own encoding: every PDU whole, framed as the server's reader frames it.
        let Ok(transport::Framed::Whole(total)) = transport::frame(commands, &|_| Some(usize::MAX))
        else {
            return Err(io::Error::other("command PDUs not whole"));
        };
        let (pdu, rest) = commands.split_at(total);
        stream.write_all(&pdu[..PDATA_HEADER_LEN])?;
        stream.write_all(&pdu[PDATA_HEADER_LEN..])?;
        commands = rest;
    }
    let dataset = message.instance.dataset();
    let count = dataset.len().div_ceil(capacity).max(1);
    let empty = dataset.is_empty().then_some(&[][..]);
    let mut written = message.command_pdus.len() as u64;
    for (i, chunk) in dataset.chunks(capacity).chain(empty).enumerate() {
        let header = pdata_header(
            message.context_id,
            false,
            i + 1 == count,
            chunk.len() as u32,
        );
        stream.write_all(&header)?;
        stream.write_all(chunk)?;
        written += (PDATA_HEADER_LEN + chunk.len()) as u64;
    }
    Ok(written)
}

/// Reads PDUs until one complete command set has arrived; returns its bytes.
fn read_response(
    reader: &mut impl Read,
    body: &mut Vec<u8>,
    command: &mut Vec<u8>,
) -> Result<(), String> {
    command.clear();
    loop {
        let pdu_type = read_pdu(reader, body)?;
        if pdu_type != pdu::pdu_type::P_DATA_TF {
            return Err(describe_unexpected(pdu_type, body));
        }
        for pdv in pdu::pdvs(body) {
            let pdv = pdv.map_err(|e| format!("bad PDV in response: {e}"))?;
            if !pdv.is_command {
                return Err("data set fragment in a C-STORE-RSP".to_owned());
            }
            command.extend_from_slice(pdv.data);
            if pdv.is_last {
                return Ok(());
            }
        }
    }
}

/// Runs one association over `messages`, filling `outcome` as it goes (so that what was
/// done before an error is still reported).
pub fn run_association(params: &Params, messages: &mut [Message<'_>], outcome: &mut Outcome) {
    if let Err(e) = run_inner(params, messages, outcome) {
        outcome.error = Some(e);
    }
}

fn run_inner(
    params: &Params,
    messages: &mut [Message<'_>],
    outcome: &mut Outcome,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(&params.address).map_err(|e| io_err(&params.address, e))?;
    stream
        .set_nodelay(!params.nagle)
        .map_err(|e| io_err("TCP_NODELAY", e))?;
    stream
        .set_read_timeout(Some(params.timeout))
        .map_err(|e| io_err("read timeout", e))?;
    let mut reader = BufReader::with_capacity(
        64 * 1024,
        stream.try_clone().map_err(|e| io_err("socket clone", e))?,
    );

    let rq = pdu::AssociateRq {
        protocol_version: 1,
        called_ae: params.called_ae.clone(),
        calling_ae: params.calling_ae.clone(),
        application_context: pdu::APPLICATION_CONTEXT_NAME.to_owned(),
        presentation_contexts: params
            .contexts
            .iter()
            .map(|c| pdu::PresentationContextRq {
                id: c.id,
                abstract_syntax: c.abstract_syntax.clone(),
                transfer_syntaxes: vec![c.transfer_syntax.clone()],
            })
            .collect(),
        user_info: pdu::UserInformation {
            max_pdu_length: Some(OWN_MAX_PDU),
            implementation_class_uid: Some(IMPLEMENTATION_CLASS_UID.to_owned()),
            implementation_version_name: Some("STORESCP_LOADGEN".to_owned()),
            ..Default::default()
        },
    };
    stream
        .write_all(&pdu::encode_associate_rq(&rq))
        .map_err(|e| io_err("sending A-ASSOCIATE-RQ", e))?;
    let mut body = Vec::with_capacity(OWN_MAX_PDU as usize);
    let pdu_type = read_pdu(&mut reader, &mut body)?;
    if pdu_type != pdu::pdu_type::ASSOCIATE_AC {
        return Err(describe_unexpected(pdu_type, &body));
    }
    let ac = pdu::parse_associate_ac(&body).map_err(|e| format!("bad A-ASSOCIATE-AC: {e}"))?;
    let mut accepted = [false; 256];
    for pc in &ac.presentation_contexts {
        let proposed = params.contexts.iter().find(|c| c.id == pc.id);
        if pc.result == pdu::presentation_result::ACCEPTANCE
            && proposed.is_some_and(|c| c.transfer_syntax == pc.transfer_syntax)
        {
            accepted[usize::from(pc.id)] = true;
        }
    }
    let limit = effective_limit(params.max_pdu, ac.max_pdu_length);
    let capacity = fragment_capacity(limit);

    let mut headers = Vec::with_capacity(FRAGMENTS_PER_WRITE);
    let mut command = Vec::with_capacity(256);
    for message in messages.iter_mut() {
        if !accepted[usize::from(message.context_id)] {
            outcome.not_sent += 1;
            continue;
        }
        // The command was pre-encoded with our own limit; an acceptor with a smaller one
        // (below the ~200 bytes of a command set, so never in practice) gets a fresh copy.
        if limit != 0 && message.command_pdus.len() > limit as usize + 6 {
            message.command_pdus = encode_command(
                message.instance,
                message.context_id,
                message.message_id,
                limit,
            );
        }
        let started = Instant::now();
        let sent = if params.nagle {
            send_in_pieces(&mut stream, message, capacity)
        } else {
            send_message(&mut stream, message, capacity, &mut headers)
        };
        let written = sent.map_err(|e| io_err("sending C-STORE-RQ", e))?;
        outcome.wire_bytes += written;
        read_response(&mut reader, &mut body, &mut command)?;
        let elapsed = started.elapsed().as_micros();
        outcome
            .latencies_us
            .push(u32::try_from(elapsed).unwrap_or(u32::MAX));
        let rsp = dimse::parse_command(&command).map_err(|e| format!("bad C-STORE-RSP: {e}"))?;
        if rsp.message_id_being_responded_to != Some(message.message_id) {
            return Err(format!(
                "C-STORE-RSP answers message {:?}, expected {}",
                rsp.message_id_being_responded_to, message.message_id
            ));
        }
        match rsp.status {
            Some(0) => {
                outcome.succeeded += 1;
                outcome.dataset_bytes += message.instance.dataset().len() as u64;
            }
            other => {
                outcome.failed += 1;
                if outcome.failure_examples.len() < 5 {
                    outcome.failure_examples.push((
                        other.unwrap_or(0xFFFF),
                        message.instance.sop_instance_uid.clone(),
                    ));
                }
            }
        }
    }

    stream
        .write_all(&pdu::encode_release_rq())
        .map_err(|e| io_err("sending A-RELEASE-RQ", e))?;
    let pdu_type = read_pdu(&mut reader, &mut body)?;
    if pdu_type != pdu::pdu_type::RELEASE_RP {
        return Err(describe_unexpected(pdu_type, &body));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matches_core_encoder() {
        for (ctx, cmd, last, len) in [(1u8, false, true, 5usize), (3, false, false, 16372)] {
            let data = vec![0xAB; len];
            let mut core = Vec::new();
            pdu::encode_p_data(&mut core, ctx, cmd, last, &data);
            let mut ours = pdata_header(ctx, cmd, last, len as u32).to_vec();
            ours.extend_from_slice(&data);
            assert_eq!(core, ours);
        }
    }

    /// Written in pieces or in one go, a message is the same bytes on the wire.
    #[test]
    #[allow(clippy::expect_used)]
    fn pieces_are_the_same_bytes() {
        let mut file = crate::part10::tests::sample();
        file.extend(std::iter::repeat_n(0x5A, 40_000));
        let instance =
            crate::part10::instance_from_bytes("sample.dcm".into(), file).expect("a Part 10 file");
        let message = Message {
            instance: &instance,
            context_id: 3,
            message_id: 7,
            command_pdus: encode_command(&instance, 3, 7, 16384),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sender =
            TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (mut receiver, _) = listener.accept().expect("accept");
        let capacity = fragment_capacity(16384);
        let mut received = Vec::new();
        for in_pieces in [false, true] {
            let written = if in_pieces {
                send_in_pieces(&mut sender, &message, capacity)
            } else {
                send_message(&mut sender, &message, capacity, &mut Vec::new())
            };
            let mut bytes = vec![0; written.expect("sent") as usize];
            receiver.read_exact(&mut bytes).expect("received");
            received.push(bytes);
        }
        assert_eq!(received[0], received[1]);
        // The command PDU and three data set fragments, the last one flagged last.
        assert_eq!(
            received[0].len(),
            message.command_pdus.len() + 3 * 12 + 40_004
        );
    }

    #[test]
    fn fragments_respect_the_limit() {
        // PS3.8 D.1: 16384 is the whole variable field; 6 bytes go to the PDV item header.
        assert_eq!(fragment_capacity(16384), 16378);
        assert_eq!(effective_limit(16384, 0), 16384);
        assert_eq!(effective_limit(0, 65536), 65536);
        assert_eq!(effective_limit(16384, 4096), 4096);
        assert_eq!(effective_limit(0, 0), 0);
        assert!(fragment_capacity(0) >= 1 << 30);
    }
}
