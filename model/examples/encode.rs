//! Prints the token count and first ids of a text file (a debugging aid for the tokenizer).
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let t = dejavu_model::OptTokenizer::from_dir(std::path::Path::new(&args[1])).unwrap();
    let text = std::fs::read_to_string(&args[2]).unwrap();
    let n: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(text.len());
    let text: String = text.chars().take(n).collect();
    let ids = t.encode(&text).unwrap();
    println!("{} {:?}", ids.len(), &ids[..ids.len().min(60)]);
}
