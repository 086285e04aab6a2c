//! The binding layer of fastroute's decision core: pyclasses, argument extraction and error
//! mapping only. No routing logic lives here, and no other file imports pyo3.

use pyo3::prelude::*;

pub mod tokens;

/// Does nothing: the baseline for timing the Python→Rust crossing.
#[pyfunction]
fn noop() {}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(noop, m)?)?;
    Ok(())
}
