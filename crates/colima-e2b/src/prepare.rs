//! `colima-e2b prepare`: builds the `code-interpreter-v1` template's image offline with
//! the server's template builder. The Python wheels are downloaded on the host (where a
//! package index is reachable; containers need none) into a cache keyed by the recipe,
//! then sent to the engine's builder with the template's Dockerfile and the interpreter
//! service, which are compiled into this binary so an installed server can build it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sandbox_core::backend::{BuildEvent, BuildRequest};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// The template the e2b-code-interpreter SDK creates by default.
pub const TEMPLATE_NAME: &str = "code-interpreter-v1";

/// Repository of the template's image; the tag is [`recipe`].
const IMAGE_REPOSITORY: &str = "colima-e2b/code-interpreter";

/// The template's files: path in the build context and content.
const FILES: &[(&str, &[u8])] = &[
    (
        "Dockerfile",
        include_bytes!("../../../templates/code-interpreter/Dockerfile"),
    ),
    (
        "requirements.txt",
        include_bytes!("../../../templates/code-interpreter/requirements.txt"),
    ),
    (
        "interpreter/server.py",
        include_bytes!("../../../templates/code-interpreter/interpreter/server.py"),
    ),
    (
        "interpreter/python_kernel.py",
        include_bytes!("../../../templates/code-interpreter/interpreter/python_kernel.py"),
    ),
    (
        "interpreter/bash_kernel.py",
        include_bytes!("../../../templates/code-interpreter/interpreter/bash_kernel.py"),
    ),
    (
        "interpreter/kernel_channel.py",
        include_bytes!("../../../templates/code-interpreter/interpreter/kernel_channel.py"),
    ),
    (
        "interpreter/js_kernel.js",
        include_bytes!("../../../templates/code-interpreter/interpreter/js_kernel.js"),
    ),
];

/// Started in every sandbox of the template, as its user.
pub const START_CMD: &str = "python3 /opt/colima-e2b/interpreter/server.py";

/// Passes once the service accepts connections (it warms the first kernel afterwards).
pub const READY_CMD: &str = "for i in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/49999) \
    2>/dev/null && exit 0; sleep 0.025; done; exit 1";

/// The first 12 hex digits of the SHA-256 of `parts` (each length-prefixed).
fn short_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The recipe: a hash of the template's files, so a changed recipe builds anew.
pub fn recipe() -> String {
    short_hash(
        FILES
            .iter()
            .flat_map(|(path, content)| [path.as_bytes(), *content]),
    )
}

/// The image reference of the current recipe.
pub fn image() -> String {
    format!("{IMAGE_REPOSITORY}:{}", recipe())
}

/// The template as configuration names it by default.
pub fn template() -> sandbox_core::template::Template {
    let mut t = sandbox_core::template::Template::new(image());
    t.start_cmd = Some(START_CMD.into());
    t.ready_cmd = Some(READY_CMD.into());
    t
}

fn requirements() -> &'static [u8] {
    FILES
        .iter()
        .find(|(p, _)| *p == "requirements.txt")
        .map_or(&[][..], |(_, c)| c)
}

/// Where the wheels of these requirements are cached (env `COLIMA_E2B_CACHE` overrides
/// the directory, as for deploy/images.sh).
fn wheel_dir() -> PathBuf {
    let cache = std::env::var_os("COLIMA_E2B_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/colima-e2b"));
    cache.join(format!("wheels-{}", short_hash([requirements()])))
}

/// Downloads the wheels for the image's Python (Debian bookworm: CPython 3.11, x86_64)
/// on the host, unless this recipe's are cached.
fn download_wheels(dir: &Path) -> Result<(), String> {
    let done = dir.join(".complete");
    if done.exists() {
        eprintln!("[prepare] wheels cached in {}", dir.display());
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let req = dir.join("requirements.txt");
    std::fs::write(&req, requirements()).map_err(|e| format!("{}: {e}", req.display()))?;
    let python = std::env::var("COLIMA_E2B_PIP_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!(
        "[prepare] downloading wheels with {python} -m pip into {}",
        dir.display()
    );
    let started = Instant::now();
    let status = std::process::Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--only-binary=:all:", "--platform", "manylinux2014_x86_64"])
        .args(["--python-version", "3.11", "--implementation", "cp"])
        .arg("--dest")
        .arg(dir)
        .arg("-r")
        .arg(&req)
        .status()
        .map_err(|e| format!("cannot run {python} -m pip: {e} (set COLIMA_E2B_PIP_PYTHON)"))?;
    if !status.success() {
        return Err(format!(
            "pip could not download the wheels ({status}); with no package index reachable, \
             copy the wheels of templates/code-interpreter/requirements.txt into {} and \
             create {} there",
            dir.display(),
            done.display()
        ));
    }
    std::fs::write(&done, b"").map_err(|e| format!("{}: {e}", done.display()))?;
    eprintln!(
        "[prepare] wheels downloaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the build context (the template's files and the wheels) as a tar archive.
fn pack(wheels: &Path) -> Result<tempfile::NamedTempFile, String> {
    let file = tempfile::NamedTempFile::new().map_err(|e| format!("temporary file: {e}"))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(
        file.reopen().map_err(|e| e.to_string())?,
    ));
    for (path, content) in FILES {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, *content)
            .map_err(|e| format!("packing {path}: {e}"))?;
    }
    for entry in std::fs::read_dir(wheels).map_err(|e| format!("{}: {e}", wheels.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".whl") {
            tar.append_path_with_name(entry.path(), Path::new("wheels").join(&name))
                .map_err(|e| format!("packing {}: {e}", entry.path().display()))?;
        }
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| format!("writing the build context: {e}"))?;
    Ok(file)
}

/// Builds the template's image on the configured engine unless it is there already
/// (`force`: build anew). Progress goes to stderr.
pub async fn run(config: &Config, force: bool) -> Result<(), String> {
    let backend = crate::engine::connect(config).await?;
    let image = image();
    if !force {
        match backend.image_info(&image).await {
            Ok(Some(info)) => {
                eprintln!(
                    "[prepare] {image} is present on {backend} ({} MB); nothing to do",
                    info.size.unwrap_or(0) >> 20
                );
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => return Err(format!("cannot inspect {image}: {e}")),
        }
    }
    let base = "colima-e2b/base:latest";
    if !matches!(backend.image_info(base).await, Ok(Some(_))) {
        return Err(format!(
            "{base} is missing on {backend}: build it first with `bash deploy/images.sh`"
        ));
    }
    let wheels = wheel_dir();
    download_wheels(&wheels)?;
    let context = pack(&wheels)?;
    eprintln!("[prepare] building {image} on {backend}");
    let started = Instant::now();
    let req = BuildRequest {
        tag: image.clone(),
        context: context.path().to_path_buf(),
        dockerfile: "Dockerfile".into(),
        labels: [("dev.colima-e2b.template-recipe".to_string(), recipe())].into(),
        memory_bytes: 4 << 30,
        cpus: 2.0,
        network: false,
        no_cache: force,
    };
    let sink = |event: BuildEvent| match event {
        BuildEvent::Step {
            number,
            total,
            text,
        } => eprintln!("[prepare] step {number}/{total}: {text}"),
        BuildEvent::Cached => eprintln!("[prepare]   (cached)"),
        BuildEvent::Output(line) => {
            let line = line.trim_end();
            if !line.is_empty() {
                eprintln!("[prepare]   {line}");
            }
        }
    };
    let info = backend
        .build_image(&req, &sink)
        .await
        .map_err(|e| format!("building {image}: {e}"))?;
    eprintln!(
        "[prepare] built {image} in {:.0} s ({} MB)",
        started.elapsed().as_secs_f64(),
        info.size.unwrap_or(0) >> 20
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_names_the_image_and_covers_every_file() {
        assert_eq!(recipe().len(), 12);
        assert_eq!(image(), format!("{IMAGE_REPOSITORY}:{}", recipe()));
        let dockerfile = String::from_utf8_lossy(FILES[0].1);
        for (path, _) in FILES.iter().skip(2) {
            let dir = path.split('/').next().unwrap_or_default();
            assert!(
                dockerfile.contains(&format!("COPY {dir} ")),
                "{path} is copied"
            );
        }
        assert!(String::from_utf8_lossy(requirements()).contains("pandas=="));
    }

    #[test]
    fn every_file_of_the_template_is_compiled_in() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates/code-interpreter");
        let mut on_disk = Vec::new();
        let mut todo = vec![dir.clone()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).expect("template dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    if path.file_name().is_some_and(|n| n != "__pycache__") {
                        todo.push(path);
                    }
                } else {
                    let rel = path.strip_prefix(&dir).expect("inside");
                    on_disk.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut compiled: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        compiled.sort();
        assert_eq!(
            compiled, on_disk,
            "prepare.rs FILES lists the template's files"
        );
    }
}
