//! `cargo xtask deb`: `target/debian/mwan_<version>_<arch>.deb`.
//!
//! The package is staged as the tree it installs, with a `DEBIAN`
//! directory (control file, conffiles, md5sums and the maintainer scripts
//! of `mwan-user/packaging/debian/`), and built by `dpkg-deb`. The man
//! pages and shell completions are rendered from mwan's clap definitions
//! (`mwan-user/src/cli.rs`, compiled into xtask by path), the library
//! dependencies are `dpkg-shlibdeps`'s, and the unit goes where this
//! machine's systemd package puts its own. Then `lintian` checks it
//! (overrides, each with its reason: `packaging/debian/lintian-overrides`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::CommandFactory;

#[path = "../../mwan-user/src/cli.rs"]
#[allow(dead_code)]
mod cli;

/// The tools `deb` runs, with their Debian packages.
pub const DEB_TOOLS: [(&str, &str); 5] = [
    ("dpkg-deb", "dpkg"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("strip", "binutils"),
    ("gzip", "gzip"),
    ("lintian", "lintian"),
];

/// Who the package names as its maintainer, unless `DEBFULLNAME` and
/// `DEBEMAIL` say otherwise (Debian's variables for it).
const MAINTAINER: &str = "mwan maintainers <maintainers@mwan.example.org>";

const PACKAGE: &str = "mwan";

/// What `deb` was asked for.
pub struct Options {
    /// The mwan binary to package (xtask builds it when not given).
    pub bin: Option<PathBuf>,
    /// Where the .deb goes.
    pub out: PathBuf,
    pub lintian: bool,
}

impl Options {
    pub fn parse(root: &Path, args: &[String]) -> Result<Options> {
        let mut o = Options {
            bin: None,
            out: root.join("target/debian"),
            lintian: true,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| anyhow!("deb: {a} needs a path"))
            };
            match a.as_str() {
                "--bin" => o.bin = Some(value()?),
                "--out" => o.out = value()?,
                "--no-lintian" => o.lintian = false,
                other => bail!("deb: unknown argument `{other}`"),
            }
        }
        Ok(o)
    }
}

/// Builds the package of `bin` into `out`; returns its path.
pub fn build(root: &Path, bin: &Path, o: &Options) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let stage = o.out.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    stage_files(root, bin, &stage, version)?;
    control_files(root, &stage, version, &arch)?;
    let deb = o.out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    crate::status(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zxz"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("xtask: built {}", deb.display());
    if o.lintian {
        lintian(&deb)?;
    }
    Ok(deb)
}

/// Runs lintian on `deb`: errors and warnings fail.
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args([
            "--info",
            "--display-level",
            ">=pedantic",
            "--show-overrides",
        ])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    if !out.status.success() || !bad.is_empty() {
        bail!("lintian: {} errors or warnings", bad.len().max(1));
    }
    println!("xtask: lintian: no errors, no warnings");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Writes `bytes` at `rel` under `stage` with `mode`.
fn put(stage: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let p = stage.join(rel);
    fs::create_dir_all(p.parent().expect("a file under the stage"))?;
    fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n`: compressed as Debian's tools do (no name, no time stamp).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().expect("gzip writer")?;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

/// Where this machine's systemd package installs its units (`/lib` before
/// Debian 13, `/usr/lib` since), so the package follows the same rule.
fn unit_dir() -> String {
    let listed = Command::new("dpkg-query")
        .args(["-L", "systemd"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .find_map(|l| l.strip_suffix("/systemd-journald.service"))
        .filter(|d| d.ends_with("/systemd/system"))
        .unwrap_or("/usr/lib/systemd/system")
        .trim_start_matches('/')
        .to_string()
}

fn stage_files(root: &Path, bin: &Path, stage: &Path, version: &str) -> Result<()> {
    let packaging = root.join("mwan-user/packaging");
    let read = |rel: &str| {
        fs::read(packaging.join(rel)).with_context(|| format!("reading packaging/{rel}"))
    };
    let sbin = stage.join("usr/sbin/mwan");
    fs::create_dir_all(sbin.parent().expect("usr/sbin"))?;
    crate::status(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment", "-o"])
            .arg(&sbin)
            .arg(bin),
    )?;
    fs::set_permissions(&sbin, fs::Permissions::from_mode(0o755))?;
    put(
        stage,
        &format!("{}/mwan.service", unit_dir()),
        &read("mwan.service")?,
        0o644,
    )?;
    put(
        stage,
        "etc/mwan/mwan.toml",
        &read("mwan.example.toml")?,
        0o644,
    )?;
    for script in ["mwan-ha-notify", "mwan-ha-check"] {
        let text = read(&format!("ha/{script}"))?;
        put(stage, &format!("usr/lib/mwan/{script}"), &text, 0o755)?;
    }
    let doc = "usr/share/doc/mwan";
    for (src, name) in [
        ("ha/keepalived.conf", "keepalived.conf"),
        ("ha/conntrackd.conf", "conntrackd.conf"),
        ("ha/mwan.toml", "mwan-ha.toml"),
        ("mwan.example.toml", "mwan.toml"),
    ] {
        put(stage, &format!("{doc}/examples/{name}"), &read(src)?, 0o644)?;
    }
    docs(root, stage, doc, version)?;
    put(
        stage,
        &format!("usr/share/lintian/overrides/{PACKAGE}"),
        &read("debian/lintian-overrides")?,
        0o644,
    )?;
    man_pages(stage)?;
    completions(stage)
}

/// The README and the reference docs (compressed beyond 4 kB, as Debian
/// policy asks), the copyright file and the changelog.
fn docs(root: &Path, stage: &Path, doc: &str, version: &str) -> Result<()> {
    let mut files = vec![root.join("README.md")];
    for name in [
        "CONFIG.md",
        "CLI.md",
        "HA.md",
        "METRICS.md",
        "ARCHITECTURE.md",
    ] {
        files.push(root.join("docs").join(name));
    }
    for f in files {
        let bytes = fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.file_name().expect("a file").to_string_lossy();
        if bytes.len() > 4096 {
            put(stage, &format!("{doc}/{name}.gz"), &gzip(&bytes)?, 0o644)?;
        } else {
            put(stage, &format!("{doc}/{name}"), &bytes, 0o644)?;
        }
    }
    let packaging = root.join("mwan-user/packaging/debian");
    put(
        stage,
        &format!("{doc}/copyright"),
        &fs::read(packaging.join("copyright"))?,
        0o644,
    )?;
    let changelog = format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  \
         * Built from the mwan source tree; its git history is the changelog.\n\n \
         -- {}  {}\n",
        maintainer(),
        changelog_date(root)?
    );
    put(
        stage,
        &format!("{doc}/changelog.gz"),
        &gzip(changelog.as_bytes())?,
        0o644,
    )
}

fn maintainer() -> String {
    match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(mail)) if !name.is_empty() && !mail.is_empty() => {
            format!("{name} <{mail}>")
        }
        _ => MAINTAINER.to_string(),
    }
}

/// The last commit's date (RFC 2822), so that the same tree gives the same
/// changelog; `SOURCE_DATE_EPOCH` (reproducible builds) wins.
fn changelog_date(root: &Path) -> Result<String> {
    let mut date = Command::new("date");
    date.args(["-R", "-u"]).env("LC_ALL", "C");
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(e) => e,
        Err(_) => output(
            Command::new("git")
                .args(["log", "-1", "--format=%ct"])
                .current_dir(root),
        )
        .unwrap_or_default(),
    };
    if !epoch.is_empty() {
        date.arg("-d").arg(format!("@{epoch}"));
    }
    output(&mut date)
}

/// `mwan(8)` and `mwan-SUBCOMMAND(8)` for every subcommand.
fn man_pages(stage: &Path) -> Result<()> {
    let mut cmd = cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for (i, page) in pages.into_iter().enumerate() {
        let man = clap_mangen::Man::new(page)
            .section("8")
            .manual("System Administration")
            .source(format!("mwan {}", env!("CARGO_PKG_VERSION")));
        let mut text = Vec::new();
        man.render(&mut text)?;
        if i == 0 {
            text.extend(main_page_sections().render().into_bytes());
        }
        put(
            stage,
            &format!("usr/share/man/man8/{}.gz", man.get_filename()),
            &gzip(&text)?,
            0o644,
        )?;
    }
    Ok(())
}

/// EXIT STATUS, FILES and SEE ALSO of `mwan(8)`.
fn main_page_sections() -> roff::Roff {
    use roff::{bold, roman};
    let mut r = roff::Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in cli::exit::MEANINGS {
        r.control("TP", [])
            .text([bold(code.to_string())])
            .text([roman(meaning)]);
    }
    r.control("SH", ["FILES"]);
    for (file, what) in [
        (cli::DEFAULT_CONFIG, "the config (see CONFIG.md)"),
        (
            "/run/mwan/",
            "the daemon's control socket and the record of what it changed",
        ),
        ("/sys/fs/bpf/mwan/", "the datapath's pinned maps"),
        (
            "/usr/share/doc/mwan/",
            "README, CONFIG, CLI, HA, METRICS and ARCHITECTURE; HA pair examples",
        ),
    ] {
        r.control("TP", []).text([bold(file)]).text([roman(what)]);
    }
    r.control("SH", ["SEE ALSO"]);
    r.text([roman(
        "systemctl(1), nft(8), ip(8), keepalived(8), conntrackd(8)",
    )]);
    r
}

/// bash, zsh and fish completions, where Debian's shells look for them.
fn completions(stage: &Path) -> Result<()> {
    use clap_complete::Shell;
    for (shell, rel) in [
        (Shell::Bash, "usr/share/bash-completion/completions/mwan"),
        (Shell::Zsh, "usr/share/zsh/vendor-completions/_mwan"),
        (Shell::Fish, "usr/share/fish/vendor_completions.d/mwan.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cli::Cli::command(), "mwan", &mut text);
        put(stage, rel, &text, 0o644)?;
    }
    Ok(())
}

/// DEBIAN/: control (with `dpkg-shlibdeps`'s dependencies and the size),
/// conffiles, md5sums and the maintainer scripts.
fn control_files(root: &Path, stage: &Path, version: &str, arch: &str) -> Result<()> {
    let packaging = root.join("mwan-user/packaging/debian");
    let template = fs::read_to_string(packaging.join("control"))?;
    let (files, size) = file_list(stage)?;
    let control = template
        .replace("{version}", version)
        .replace("{arch}", arch)
        .replace("{maintainer}", &maintainer())
        .replace("{installed_size}", &size.div_ceil(1024).to_string())
        .replace("{shlibs}", &shlibs(stage)?);
    put(stage, "DEBIAN/control", control.as_bytes(), 0o644)?;
    let conffiles: String = files
        .iter()
        .filter(|f| f.starts_with("etc/"))
        .map(|f| format!("/{f}\n"))
        .collect();
    put(stage, "DEBIAN/conffiles", conffiles.as_bytes(), 0o644)?;
    let mut md5 = Command::new("md5sum");
    md5.current_dir(stage).args(&files);
    let sums = output(&mut md5)? + "\n";
    put(stage, "DEBIAN/md5sums", sums.as_bytes(), 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        put(
            stage,
            &format!("DEBIAN/{script}"),
            &fs::read(packaging.join(script))?,
            0o755,
        )?;
    }
    Ok(())
}

/// The staged files (relative paths, sorted) and their total size.
fn file_list(stage: &Path) -> Result<(Vec<String>, u64)> {
    fn walk(dir: &Path, stage: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
        for e in fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                walk(&p, stage, out)?;
            } else {
                let rel = p.strip_prefix(stage)?.to_string_lossy().into_owned();
                out.push((rel, e.metadata()?.len()));
            }
        }
        Ok(())
    }
    let mut all = Vec::new();
    walk(stage, stage, &mut all)?;
    all.sort();
    let size = all.iter().map(|(_, s)| s.div_ceil(1024) * 1024).sum();
    Ok((all.into_iter().map(|(f, _)| f).collect(), size))
}

/// The shared libraries the binary links, as `dpkg-shlibdeps` names their
/// packages (it wants a `debian/control` beside it: a minimal one).
fn shlibs(stage: &Path) -> Result<String> {
    let dir = stage
        .parent()
        .expect("stage has a parent")
        .join("shlibdeps");
    put(
        &dir,
        "debian/control",
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n").as_bytes(),
        0o644,
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&dir)
            .arg("-O")
            .arg(stage.join("usr/sbin/mwan")),
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("dpkg-shlibdeps named no dependency: {out}"))
}
