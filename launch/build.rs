// tch links libtorch dynamically and sets no rpath: without one every test
// binary and the `gantry` CLI would need LD_LIBRARY_PATH. Point the runtime
// search path at the libtorch the build used.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&root).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
