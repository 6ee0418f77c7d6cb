//! Test certificates for TLS tests (shared with launch/tests/cluster.rs through `#[path]`).

/// A CA and a leaf certificate for localhost / 127.0.0.1, made with the `openssl` CLI; `None`
/// (the test is skipped) on a machine without it.
pub fn make_certs(dir: &std::path::Path) -> Option<()> {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .ok()?;
    let ok = run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=gantry test CA",
        ],
    ]
    .concat())
        && run(&[
            &["req"][..],
            &ec,
            &["-keyout", "key.pem", "-out", "req.csr", "-subj", "/CN=localhost"],
        ]
        .concat())
        && run(&[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
    ok.then_some(())
}
