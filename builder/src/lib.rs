//! kiln's image builder: an image spec becomes verified sources, one in-memory
//! root tree, and the artifacts emitted from it (see DESIGN.md, "Data flow of a build").

pub mod tree;
