//! Compiles proto/gantry.proto into the `proto` module. Uses `PROTOC` when set (a system
//! protoc), otherwise the vendored binary, so a fresh machine needs nothing installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto/gantry.proto");
    tonic_prost_build::configure().compile_protos(&["proto/gantry.proto"], &["proto"])?;
    Ok(())
}
