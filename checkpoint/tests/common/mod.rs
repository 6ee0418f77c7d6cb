pub mod backend;
pub mod model;
pub mod pattern;
pub mod ranks;
pub mod s3_server;
pub mod tempdir;

/// `both!(name, scenario)`: a module `name` with tests `local` and `s3` running
/// `scenario(&Backend)` against a fresh temporary directory and a fresh S3 server.
#[macro_export]
macro_rules! both {
    ($name:ident, $scenario:path) => {
        mod $name {
            #[test]
            fn local() {
                $scenario(&$crate::common::backend::Backend::local(stringify!($name)));
            }
            #[test]
            fn s3() {
                $scenario(&$crate::common::backend::Backend::s3());
            }
        }
    };
}
