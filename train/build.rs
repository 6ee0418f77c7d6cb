// 1. tch links libtorch dynamically and sets no rpath: without one every test binary and the
//    `gantry` CLI would need LD_LIBRARY_PATH. Point the runtime search path at the libtorch
//    the build used.
// 2. Compile the C shims (csrc/): `at::_fused_adamw_`, backward with a given gradient,
//    setting a parameter's `.grad`, CUDA autocast with a dtype, the current CUDA device
//    (tch 0.24 binds none of them), and the fused operators (csrc/fused_ops.cpp, with the AVX2
//    GELU kernel of csrc/gelu_avx2.cpp) against the same libtorch
//    headers, with the same C++ ABI choice as torch-sys (LIBTORCH_CXX11_ABI, default 1;
//    PyTorch 2.11 wheels use the CXX11 ABI).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");

    let Ok(root) = std::env::var("LIBTORCH") else {
        // torch-sys fails without LIBTORCH anyway (no download feature); say why here too.
        panic!("LIBTORCH is not set (scripts/setup.sh installs libtorch; .cargo/config.toml sets it)");
    };
    let canon = |p: PathBuf| p.canonicalize().unwrap_or(p);
    let root = canon(PathBuf::from(root));
    let lib = std::env::var("LIBTORCH_LIB").map_or_else(|_| root.clone(), PathBuf::from);
    let lib = canon(lib.join("lib"));
    let include = std::env::var("LIBTORCH_INCLUDE").map_or_else(|_| root.clone(), PathBuf::from);
    let include = canon(include.join("include"));
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());

    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    compile_shim(&include, &abi);
    // The shim calls into libtorch_cpu and libc10 directly. torch-sys links them too; naming
    // them here keeps the link order right (static shim before the shared libraries).
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

fn compile_shim(include: &Path, abi: &str) {
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi)
        // libtorch's headers are not warning-clean; the shim itself is small.
        .warnings(false)
        .file("csrc/fused_adamw.cpp")
        .file("csrc/autograd.cpp")
        .file("csrc/autocast.cpp")
        .file("csrc/device.cpp")
        .file("csrc/fused_ops.cpp")
        .compile("gantry_shims");
    // The GELU kernel of the fused operators, with AVX2 and FMA (the caller checks the CPU at
    // run time) and optimized whatever the profile: a loop of intrinsics at -O0/-O1 keeps
    // every vector on the stack. Its own library, so no libtorch header sees these flags.
    let x86 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    let mut avx2 = cc::Build::new();
    avx2.cpp(true)
        .pic(true)
        .std("c++17")
        .opt_level(3)
        .file("csrc/gelu_avx2.cpp");
    if x86 {
        avx2.flag("-mavx2").flag("-mfma");
    }
    avx2.compile("gantry_gelu_avx2");
}
