//! Any bytes as a config file: validation must return a config or errors
//! (with locations that render), never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = meshgate::config::parse(std::path::Path::new("fuzz.toml"), text) {
        // Rendering walks every span back into the text.
        let _ = e.to_string();
    }
});
