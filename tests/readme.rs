//! The README says what the command line does: its commands parse with the CLI's own
//! parser, and its flag tables list every `savae train` flag with the default `--help`
//! shows (which comes from the settings themselves).

use std::collections::HashMap;

fn readme(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Words of a command line, double quotes grouping.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `savae …` commands of a markdown file: lines of ```sh blocks and inline code
/// spans with flags, `cargo run --release --` read as `savae`; spans with placeholders
/// (`[…]`, `a|b`, `…`) are synopses, not commands, and are left out.
fn commands(md: &str) -> Vec<String> {
    let mut candidates = Vec::new();
    let mut prose = String::new();
    let mut fence: Option<bool> = None; // inside a fenced block: is it ```sh?
    for line in md.lines() {
        if line.starts_with("```") {
            fence = match fence {
                None => Some(line.trim() == "```sh"),
                Some(_) => None,
            };
            continue;
        }
        match fence {
            Some(true) => candidates.push(line.trim().to_string()),
            Some(false) => {}
            // Spans may wrap: prose is read as one line.
            None => {
                prose.push_str(line);
                prose.push(' ');
            }
        }
    }
    // Inline spans with flags (a bare `savae eval` is a name, not a command).
    candidates.extend(
        prose
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|c| c.contains(" --"))
            .map(str::to_string),
    );
    let mut out = Vec::new();
    for c in candidates {
        let c = c.replace("cargo run --release --", "savae");
        let c = c.replace("target/release/savae", "savae");
        let c = c.split_whitespace().collect::<Vec<_>>().join(" ");
        // `savae --grad unrolled` names the model `savae`, not a command.
        let is_command = c.starts_with("savae ") && !c.starts_with("savae --");
        if is_command && !c.contains(['[', '|', '…', '<']) {
            out.push(c);
        }
    }
    out
}

#[test]
fn readme_commands_parse_with_the_cli_parser() {
    let mut n = 0;
    for file in ["README.md", "checkpoints/README.md"] {
        for cmd in commands(&readme(file)) {
            match savae_cli::commands::parse_from(words(&cmd)) {
                Ok(_) => {}
                Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {}
                Err(e) => panic!("{file}: `{cmd}` does not parse:\n{e}"),
            }
            n += 1;
            println!("{file}: {cmd}");
        }
    }
    // The two fresh-machine commands, the SA-VAE one, eval, report, resume, …
    assert!(n >= 10, "only {n} commands found");
    // The parser does refuse what the old README said.
    assert!(savae_cli::commands::parse_from(words("savae train --resume RUN_DIR")).is_err());
}

/// `[default: X]` or `[default: X; text: Y]` of a help line: (image, text) defaults.
fn help_default(help: &str) -> Option<(String, String)> {
    let start = help.rfind("[default: ")? + "[default: ".len();
    let inner = &help[start..help[start..].find(']')? + start];
    Some(match inner.split_once("; text: ") {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => (inner.to_string(), inner.to_string()),
    })
}

fn same_value(readme: &str, help: &str) -> bool {
    let r = readme.trim().trim_matches('`');
    let r = if r == "—" { "none" } else { r };
    match (r.parse::<f64>(), help.parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => r == help,
    }
}

#[test]
fn readme_flag_tables_list_every_train_flag_with_its_help_default() {
    let cmd = savae_cli::commands::command();
    let train = cmd.find_subcommand("train").unwrap();
    let mut defaults: HashMap<String, Option<(String, String)>> = HashMap::new();
    for a in train.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        if long == "help" {
            continue;
        }
        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        assert!(!help.trim().is_empty(), "--{long} has no description");
        let d = help_default(&help).or_else(|| {
            let v = a.get_default_values();
            (!v.is_empty()).then(|| {
                let v = v[0].to_string_lossy().to_string();
                (v.clone(), v)
            })
        });
        defaults.insert(format!("--{long}"), d);
    }
    let md = readme("README.md");
    let mut listed = std::collections::HashSet::new();
    let mut compared = 0;
    let mut text_table = false;
    for line in md.lines() {
        if line.starts_with("| flag") {
            text_table = line.contains("(text)");
            continue;
        }
        if !line.starts_with("| `--") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let flags: Vec<String> = cells[1]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|f| f.starts_with("--"))
            .map(str::to_string)
            .collect();
        let values: Vec<&str> = cells[2].split(", ").collect();
        for f in &flags {
            listed.insert(f.clone());
        }
        if flags.len() != values.len() {
            continue;
        }
        for (f, v) in flags.iter().zip(values) {
            let Some(Some((img, text))) = defaults.get(f) else {
                continue;
            };
            let want = if text_table { text } else { img };
            assert!(
                same_value(v, want),
                "README says {f} defaults to {v}, --help says {want} (text table: {text_table})"
            );
            compared += 1;
        }
    }
    let mut missing: Vec<&String> = defaults.keys().filter(|f| !listed.contains(*f)).collect();
    missing.sort();
    assert!(missing.is_empty(), "README flag tables lack {missing:?}");
    assert!(compared >= 30, "only {compared} defaults compared");
}
