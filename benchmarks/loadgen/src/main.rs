//! `storescp-loadgen`: the load generator of the storescp benchmarks (benchmarks/README.md).
//!
//! Reads every file up front, strips the Part 10 header (PS3.10 7.1) and sends each data set
//! unchanged as a C-STORE-RQ (PS3.7 9.1.1) over N concurrent associations, one thread each,
//! synchronously (one outstanding request per association), then releases (PS3.8 7.2).
//! It reports instances, bytes, seconds, images/s and MB/s (10^6 bytes) of data set payload.
//!
//! `storescp-loadgen ceilings` measures what the machine allows (loopback TCP, page-cache and
//! durable writes, file creation, fsync latency); see `ceilings.rs`.

mod ceilings;
mod part10;
mod sender;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use part10::Instance;
use sender::{Context, Message, Outcome, Params};

const USAGE: &str = "\
usage: storescp-loadgen --port P --files PATH [--files PATH ...] [options]
       storescp-loadgen ceilings --dir DIR [--scale F] [--only KEY,...] [--json] [--no-cleanup]

Sends every instance once (times --repeat) as C-STORE-RQ, the data set bytes unchanged.

options:
  --host HOST            server address (default 127.0.0.1)
  --port P               server port (required)
  --called-ae AE         called AE title (default ANY-SCP)
  --calling-ae AE        calling AE title (default LOADGEN)
  --associations N       concurrent associations, one thread each (default 1); instances
                         are dealt round-robin among them
  --files PATH           a directory (walked recursively, non-DICOM files skipped), a Part 10
                         file, or a text file listing paths one per line; repeatable
  --repeat K             send each association's share K times (same UIDs: the server's
                         duplicate policy applies) (default 1)
  --max-pdu N            largest P-DATA-TF body sent, further capped by the acceptor's
                         maximum; 0 = as large as the acceptor allows (default 16384)
  --timeout S            seconds to wait for any response (default 120)
  --nagle                leave Nagle's algorithm on (no TCP_NODELAY) and write each PDU in
                         pieces, as dcmtk's storescu does: the command PDU, then each data
                         set fragment as its 12 header bytes and then its value
  --json                 print one JSON object instead of a line of text

ceilings: --only takes the keys of the rows to measure (default all; an unknown key lists
them); --no-cleanup leaves the files made for the caller to remove.
";

/// Parsed command line of the send mode.
#[derive(Debug)]
struct Args {
    host: String,
    port: u16,
    called_ae: String,
    calling_ae: String,
    associations: usize,
    files: Vec<PathBuf>,
    repeat: usize,
    max_pdu: u32,
    timeout: Duration,
    nagle: bool,
    json: bool,
}

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a String, String> {
    it.next().ok_or_else(|| format!("{flag} needs a value"))
}

fn number<T: std::str::FromStr>(text: &str, flag: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag}: not a valid number: {text}"))
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args {
        host: "127.0.0.1".to_owned(),
        port: 0,
        called_ae: "ANY-SCP".to_owned(),
        calling_ae: "LOADGEN".to_owned(),
        associations: 1,
        files: Vec::new(),
        repeat: 1,
        max_pdu: 16384,
        timeout: Duration::from_secs(120),
        nagle: false,
        json: false,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--host" => args.host = value(&mut it, flag)?.clone(),
            "--port" => args.port = number(value(&mut it, flag)?, flag)?,
            "--called-ae" => args.called_ae = value(&mut it, flag)?.clone(),
            "--calling-ae" => args.calling_ae = value(&mut it, flag)?.clone(),
            "--associations" => args.associations = number(value(&mut it, flag)?, flag)?,
            "--files" => args.files.push(PathBuf::from(value(&mut it, flag)?)),
            "--repeat" => args.repeat = number(value(&mut it, flag)?, flag)?,
            "--max-pdu" => args.max_pdu = number(value(&mut it, flag)?, flag)?,
            "--timeout" => {
                let secs: f64 = number(value(&mut it, flag)?, flag)?;
                if !(secs.is_finite() && secs > 0.0) {
                    return Err("--timeout must be positive".to_owned());
                }
                args.timeout = Duration::from_secs_f64(secs);
            }
            "--nagle" => args.nagle = true,
            "--json" => args.json = true,
            other => return Err(format!("unknown argument: {other}")),
        }
    }
    if args.port == 0 {
        return Err("--port is required".to_owned());
    }
    if args.files.is_empty() {
        return Err("--files is required".to_owned());
    }
    if args.associations == 0 || args.repeat == 0 {
        return Err("--associations and --repeat must be at least 1".to_owned());
    }
    for ae in [&args.called_ae, &args.calling_ae] {
        if ae.is_empty() || ae.len() > 16 {
            return Err(format!("AE title must be 1-16 characters: {ae:?}"));
        }
    }
    Ok(args)
}

/// One presentation context per (SOP class, transfer syntax) pair, in order of first use.
fn contexts_for(instances: &[Instance]) -> Result<(Vec<Context>, Vec<u8>), String> {
    let mut ids: HashMap<(&str, &str), u8> = HashMap::new();
    let mut contexts = Vec::new();
    let mut per_instance = Vec::with_capacity(instances.len());
    for instance in instances {
        let key = (
            instance.sop_class_uid.as_str(),
            instance.transfer_syntax.as_str(),
        );
        let id = match ids.get(&key) {
            Some(&id) => id,
            None => {
                // PS3.8 9.3.2.2: odd IDs 1..255, so at most 128 contexts.
                let id = u8::try_from(2 * contexts.len() + 1).map_err(|_| {
                    "more than 128 (SOP class, transfer syntax) pairs in the corpus".to_owned()
                })?;
                ids.insert(key, id);
                contexts.push(Context {
                    id,
                    abstract_syntax: key.0.to_owned(),
                    transfer_syntax: key.1.to_owned(),
                });
                id
            }
        };
        per_instance.push(id);
    }
    Ok((contexts, per_instance))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn run(args: &Args) -> Result<bool, String> {
    let load_started = Instant::now();
    let paths = part10::expand_inputs(&args.files)?;
    if paths.is_empty() {
        return Err("no DICOM Part 10 files found".to_owned());
    }
    let instances = paths
        .iter()
        .map(|p| part10::read_instance(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (contexts, context_of) = contexts_for(&instances)?;
    let params = Params {
        address: format!("{}:{}", args.host, args.port),
        called_ae: args.called_ae.clone(),
        calling_ae: args.calling_ae.clone(),
        max_pdu: args.max_pdu,
        contexts,
        timeout: args.timeout,
        nagle: args.nagle,
    };

    // Deal the instances round-robin, repeat each share, pre-encode the command PDUs.
    let mut shares: Vec<Vec<Message<'_>>> = (0..args.associations).map(|_| Vec::new()).collect();
    for (index, share) in shares.iter_mut().enumerate() {
        let mine: Vec<usize> = (index..instances.len())
            .step_by(args.associations)
            .collect();
        let mut message_id: u16 = 0;
        for _ in 0..args.repeat {
            for &i in &mine {
                message_id = message_id.checked_add(1).unwrap_or(1);
                share.push(Message {
                    instance: &instances[i],
                    context_id: context_of[i],
                    message_id,
                    command_pdus: sender::encode_command(
                        &instances[i],
                        context_of[i],
                        message_id,
                        args.max_pdu,
                    ),
                });
            }
        }
    }
    let load_seconds = load_started.elapsed().as_secs_f64();

    let barrier = Barrier::new(args.associations + 1);
    let mut outcomes: Vec<Outcome> = (0..args.associations).map(|_| Outcome::default()).collect();
    let started = std::thread::scope(|scope| {
        for (share, outcome) in shares.iter_mut().zip(outcomes.iter_mut()) {
            let params = &params;
            let barrier = &barrier;
            scope.spawn(move || {
                outcome.latencies_us.reserve(share.len());
                barrier.wait();
                sender::run_association(params, share, outcome);
            });
        }
        let started = Instant::now();
        barrier.wait();
        started
    });
    let seconds = started.elapsed().as_secs_f64();

    let mut total = Outcome::default();
    let mut errors = Vec::new();
    for (index, o) in outcomes.iter_mut().enumerate() {
        total.succeeded += o.succeeded;
        total.failed += o.failed;
        total.not_sent += o.not_sent;
        total.dataset_bytes += o.dataset_bytes;
        total.wire_bytes += o.wire_bytes;
        total.latencies_us.append(&mut o.latencies_us);
        total
            .failure_examples
            .extend(o.failure_examples.iter().cloned());
        if let Some(e) = &o.error {
            errors.push(format!("association {index}: {e}"));
        }
    }
    total.latencies_us.sort_unstable();
    let expected = (instances.len() * args.repeat) as u64;
    let images_per_s = total.succeeded as f64 / seconds;
    let mb_per_s = total.dataset_bytes as f64 / seconds / 1e6;
    let file_bytes: u64 = instances.iter().map(|i| i.file_len() as u64).sum();
    let ok = errors.is_empty() && total.succeeded == expected;
    let (p50, p99, max) = (
        percentile(&total.latencies_us, 0.5),
        percentile(&total.latencies_us, 0.99),
        percentile(&total.latencies_us, 1.0),
    );

    if args.json {
        let failures: Vec<String> = total
            .failure_examples
            .iter()
            .take(5)
            .map(|(status, uid)| {
                format!(
                    "{{\"status\": \"{status:04X}\", \"sop_instance_uid\": {}}}",
                    json_string(uid)
                )
            })
            .collect();
        let errors_json: Vec<String> = errors.iter().map(|e| json_string(e)).collect();
        println!(
            "{{\"ok\": {ok}, \"associations\": {}, \"files\": {}, \"repeat\": {}, \
             \"expected\": {expected}, \"instances\": {}, \"failed\": {}, \"not_sent\": {}, \
             \"bytes\": {}, \"wire_bytes\": {}, \"corpus_file_bytes\": {file_bytes}, \
             \"seconds\": {seconds:.6}, \"images_per_s\": {images_per_s:.3}, \
             \"mb_per_s\": {mb_per_s:.3}, \"latency_ms\": {{\"p50\": {p50:.3}, \
             \"p99\": {p99:.3}, \"max\": {max:.3}}}, \"max_pdu\": {}, \
             \"nagle\": {}, \"load_seconds\": {load_seconds:.3}, \"failure_examples\": [{}], \
             \"errors\": [{}]}}",
            args.associations,
            instances.len(),
            args.repeat,
            total.succeeded,
            total.failed,
            total.not_sent,
            total.dataset_bytes,
            total.wire_bytes,
            args.max_pdu,
            args.nagle,
            failures.join(", "),
            errors_json.join(", "),
        );
    } else {
        println!(
            "instances={}/{expected} failed={} not_sent={} bytes={} seconds={seconds:.3} \
             images/s={images_per_s:.1} MB/s={mb_per_s:.1} latency_ms(p50/p99/max)=\
             {p50:.3}/{p99:.3}/{max:.3} associations={}",
            total.succeeded, total.failed, total.not_sent, total.dataset_bytes, args.associations,
        );
        for (status, uid) in total.failure_examples.iter().take(5) {
            eprintln!("storescp-loadgen: status {status:04X} for {uid}");
        }
        for e in &errors {
            eprintln!("storescp-loadgen: {e}");
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = if argv.first().map(String::as_str) == Some("ceilings") {
        ceilings::main(&argv[1..])
    } else {
        match parse_args(&argv) {
            Ok(args) => run(&args),
            Err(e) => {
                eprintln!("storescp-loadgen: {e}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("storescp-loadgen: {e}");
            ExitCode::from(1)
        }
    }
}
