//! Image builds on Docker's classic builder: the base images a Dockerfile names (Docker
//! pulls a missing base whatever `pull` says, so they are checked first). The reading of
//! a build's stream and the classification of its failures are the core's
//! ([`sandbox_core::backend::StepTracker`], [`sandbox_core::backend::build_failure`]).

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Largest Dockerfile read from a context for the base image check.
const MAX_DOCKERFILE: u64 = 1 << 20;

/// The text of `dockerfile` in the build context `context` (a tar archive, plain or
/// gzip). `Ok(None)`: the archive has no such regular file or cannot be read as one (the
/// engine then says what is wrong); `Err`: the context file cannot be opened.
pub(crate) fn read_dockerfile(context: &Path, dockerfile: &str) -> std::io::Result<Option<String>> {
    let mut file = std::fs::File::open(context)?;
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    file.seek(SeekFrom::Start(0))?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let want = normalize(dockerfile);
    let mut archive = tar::Archive::new(reader);
    let Ok(entries) = archive.entries() else {
        return Ok(None);
    };
    for entry in entries {
        let Ok(entry) = entry else {
            return Ok(None);
        };
        let matches = entry
            .path()
            .is_ok_and(|p| normalize(&p.to_string_lossy()) == want);
        if !matches {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Ok(None);
        }
        let mut text = String::new();
        return Ok(entry
            .take(MAX_DOCKERFILE)
            .read_to_string(&mut text)
            .ok()
            .map(|_| text));
    }
    Ok(None)
}

/// A path inside the context without leading `./` or `/`.
fn normalize(path: &str) -> &str {
    let mut p = path;
    loop {
        let next = p.trim_start_matches('/');
        let next = next.strip_prefix("./").unwrap_or(next);
        if next == p {
            return p;
        }
        p = next;
    }
}

/// The images a Dockerfile takes from the engine's store: `FROM` and `COPY --from`
/// references that are neither an earlier stage nor `scratch`, with the defaults of the
/// `ARG`s declared before the first `FROM` put in. A reference that still holds a `$`
/// after that (an argument without a default) is left out: the engine resolves it.
pub(crate) fn external_images(dockerfile: &str) -> Vec<String> {
    let escape = escape_char(dockerfile);
    let mut args: HashMap<String, String> = HashMap::new();
    let mut stages: HashSet<String> = HashSet::new();
    let mut seen_from = false;
    let mut out: Vec<String> = Vec::new();
    let mut push = |image: String, stages: &HashSet<String>| {
        let lower = image.to_ascii_lowercase();
        if image.is_empty()
            || image.contains('$')
            || lower == "scratch"
            || stages.contains(&lower)
            || out.contains(&image)
        {
            return;
        }
        out.push(image);
    };
    for line in logical_lines(dockerfile, escape) {
        let (instruction, rest) = line
            .split_once(char::is_whitespace)
            .unwrap_or((line.as_str(), ""));
        match instruction.to_ascii_uppercase().as_str() {
            "ARG" if !seen_from => {
                for word in rest.split_whitespace() {
                    if let Some((name, value)) = word.split_once('=') {
                        args.insert(name.to_string(), unquote(value).to_string());
                    }
                }
            }
            "FROM" => {
                seen_from = true;
                let mut words = rest.split_whitespace().filter(|w| !w.starts_with("--"));
                let Some(image) = words.next() else { continue };
                push(substitute(image, &args), &stages);
                if let (Some(kw), Some(name)) = (words.next(), words.next()) {
                    if kw.eq_ignore_ascii_case("as") {
                        stages.insert(name.to_ascii_lowercase());
                    }
                }
            }
            "COPY" => {
                for word in rest.split_whitespace() {
                    let Some(flag) = word.strip_prefix("--") else {
                        break;
                    };
                    if let Some(from) = flag.strip_prefix("from=") {
                        let from = unquote(from);
                        if !from.bytes().all(|b| b.is_ascii_digit()) {
                            push(substitute(from, &args), &stages);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The escape character set by a `# escape=` parser directive (default `\`).
fn escape_char(dockerfile: &str) -> char {
    for line in dockerfile.lines() {
        let Some(directive) = line.trim().strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = directive.split_once('=') else {
            break;
        };
        if key.trim().eq_ignore_ascii_case("escape") {
            return match value.trim() {
                "`" => '`',
                _ => '\\',
            };
        }
    }
    '\\'
}

/// The Dockerfile's instructions, continuation lines joined, comments and blanks left out.
fn logical_lines(dockerfile: &str, escape: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut continuing = false;
    for raw in dockerfile.lines() {
        let line = raw.trim_end();
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') || (continuing && trimmed.is_empty()) {
            continue;
        }
        if let Some(body) = line.strip_suffix(escape) {
            current.push_str(body);
            current.push(' ');
            continuing = true;
            continue;
        }
        current.push_str(line);
        continuing = false;
        let done = std::mem::take(&mut current);
        if !done.trim().is_empty() {
            out.push(done.trim().to_string());
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

fn unquote(value: &str) -> &str {
    let v = value.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// Puts the known `args` into `$NAME`, `${NAME}` and `${NAME:-default}`; anything else
/// keeps its `$`.
fn substitute(text: &str, args: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            if let Some(end) = braced.find('}') {
                let inner = &braced[..end];
                let value = match inner.split_once(":-") {
                    Some((name, default)) => Some(
                        args.get(name)
                            .filter(|v| !v.is_empty())
                            .map_or(default, String::as_str),
                    ),
                    None => args.get(inner).map(String::as_str),
                };
                match value {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[at..at + 2 + end + 1]),
                }
                rest = &braced[end + 1..];
                continue;
            }
        }
        let name_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        match args.get(&after[..name_len]) {
            Some(v) if name_len > 0 => out.push_str(v),
            _ => out.push_str(&rest[at..at + 1 + name_len]),
        }
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn bases_are_read_with_stages_args_and_continuations() {
        let dockerfile = "# escape=\\\n\
            ARG BASE=colima-e2b/base:latest\n\
            ARG TAG\n\
            # a comment\n\
            FROM --platform=linux/amd64 ${BASE} AS build\n\
            RUN echo \\\n\
            \n\
              hi\n\
            FROM build AS second\n\
            FROM scratch\n\
            COPY --from=build /a /a\n\
            COPY --from=0 /b /b\n\
            COPY --chown=1:1 --from=other/image:1 /c /c\n\
            from   python:${TAG}\n\
            FROM ${MISSING:-alpine:3}\n\
            FROM $BASE\n";
        assert_eq!(
            external_images(dockerfile),
            vec!["colima-e2b/base:latest", "other/image:1", "alpine:3"]
        );
    }

    #[test]
    fn the_backtick_escape_joins_lines() {
        let dockerfile = "# escape=`\nFROM `\n  base:1\nRUN a \\\nFROM not-this\n";
        assert_eq!(external_images(dockerfile), vec!["base:1", "not-this"]);
    }

    #[test]
    fn the_dockerfile_is_found_in_plain_and_gzip_contexts() {
        let dir = std::env::temp_dir().join(format!("backend-docker-ctx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in [("./other", "x"), ("./sub/Dockerfile.x", "FROM a:1\n")] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, path, data.as_bytes())
                .expect("append");
        }
        let tar = builder.into_inner().expect("tar");
        let plain = dir.join("ctx.tar");
        std::fs::write(&plain, &tar).expect("write");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        let gzip = dir.join("ctx.tar.gz");
        std::fs::write(&gzip, gz.finish().expect("gzip")).expect("write");
        for context in [&plain, &gzip] {
            assert_eq!(
                read_dockerfile(context, "sub/Dockerfile.x").expect("read"),
                Some("FROM a:1\n".to_string())
            );
            assert_eq!(read_dockerfile(context, "Dockerfile").expect("read"), None);
        }
        std::fs::write(&plain, b"not a tar").expect("write");
        assert_eq!(read_dockerfile(&plain, "Dockerfile").expect("read"), None);
        assert!(read_dockerfile(&dir.join("missing"), "Dockerfile").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
