//! Ask the built-in engine one or more questions over a context, as the
//! server would answer them, without a bridge or a FIFO:
//! `cargo run --release -p autopoll-server --example ask -- --context docs --context README.md "question" ...`.
//! With no question, it only builds the index and prints its size and the
//! time it took (a small binary to profile the index build with callgrind).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use autopoll_server::engine::builtin::BuiltinEngine;

fn main() -> ExitCode {
    let mut roots = Vec::new();
    let mut questions = Vec::new();
    let mut threads = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--context" => match args.next() {
                Some(p) => roots.push(PathBuf::from(p)),
                None => return usage("--context needs a PATH"),
            },
            "--threads" => match args.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => threads = Some(n),
                None => return usage("--threads needs a number, e.g. --threads 1"),
            },
            _ => questions.push(a),
        }
    }
    let start = Instant::now();
    let engine = match threads {
        Some(n) => BuiltinEngine::load_with(&roots, n),
        None => BuiltinEngine::load(&roots),
    };
    let engine = match engine {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ask: {e}");
            return ExitCode::from(2);
        }
    };
    let index = engine.index();
    eprintln!(
        "ask: indexed {} files, {} bytes, {} passages in {:.3} s",
        index.files().len(),
        index.bytes(),
        index.passages(),
        start.elapsed().as_secs_f64()
    );
    for q in questions {
        let a = engine.answer_now(&q);
        println!("? {q}\n{}\nsources: {}\n", a.answer, a.sources.join(" "));
    }
    ExitCode::SUCCESS
}

fn usage(why: &str) -> ExitCode {
    eprintln!("ask: {why}\nusage: ask [--threads N] --context PATH... [QUESTION...]");
    ExitCode::from(2)
}
